//! The layering of the workspace: services (the rater, the invoicer, the
//! API, ingest, ...) are built from the libraries (the core, which decides
//! money, and the adapters: store, bus, proto, telemetry, webhook) and never
//! from each other, so that no service's money can come from another's
//! code path. Only the binary (`idlemeter-cli`) and the workspace tests put
//! services together. A new crate counts as a service until it is listed
//! as a library here.

use std::collections::BTreeMap;
use std::process::Command;

/// Crates any service may depend on.
const LIBRARIES: &[&str] = &[
    "idlemeter-core",
    "idlemeter-store",
    "idlemeter-ledger",
    "idlemeter-bus",
    "idlemeter-proto",
    "idlemeter-telemetry",
    "idlemeter-webhook",
];

/// Crates that assemble services: the binary and the workspace tests.
const ASSEMBLERS: &[&str] = &["idlemeter-cli", "idlemeter-tests"];

/// Each workspace crate and the workspace crates it depends on (any kind:
/// normal, build or dev).
fn workspace_dependencies() -> BTreeMap<String, Vec<String>> {
    let output = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("cargo metadata prints JSON");
    let packages = metadata["packages"].as_array().expect("packages");
    let members: Vec<String> = packages
        .iter()
        .filter_map(|package| package["name"].as_str().map(str::to_owned))
        .collect();
    packages
        .iter()
        .map(|package| {
            let name = package["name"].as_str().unwrap_or_default().to_owned();
            let dependencies = package["dependencies"]
                .as_array()
                .expect("dependencies")
                .iter()
                .filter_map(|dependency| dependency["name"].as_str())
                .filter(|dependency| members.iter().any(|member| member == dependency))
                .map(str::to_owned)
                .collect();
            (name, dependencies)
        })
        .collect()
}

fn is_service(name: &str) -> bool {
    !LIBRARIES.contains(&name) && !ASSEMBLERS.contains(&name)
}

#[test]
fn no_service_crate_depends_on_another_service_crate() {
    let crates = workspace_dependencies();
    let services: Vec<&String> = crates.keys().filter(|name| is_service(name)).collect();
    // The check must see the services it protects, or it proves nothing.
    for expected in ["idlemeter-api", "idlemeter-invoicer", "idlemeter-rater"] {
        assert!(
            services.iter().any(|name| *name == expected),
            "{expected} not found among {services:?}"
        );
    }
    let mut violations = Vec::new();
    for service in services {
        for dependency in &crates[service] {
            if is_service(dependency) {
                violations.push(format!("{service} depends on {dependency}"));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "services must depend on libraries only (put shared code in idlemeter-core or \
         idlemeter-store): {violations:?}"
    );
}

#[test]
fn libraries_depend_on_no_service() {
    let crates = workspace_dependencies();
    for library in LIBRARIES {
        let dependencies = crates
            .get(*library)
            .unwrap_or_else(|| panic!("{library} is not in the workspace"));
        let services: Vec<&String> = dependencies
            .iter()
            .filter(|dependency| {
                is_service(dependency) || ASSEMBLERS.contains(&dependency.as_str())
            })
            .collect();
        assert!(services.is_empty(), "{library} depends on {services:?}");
    }
}
