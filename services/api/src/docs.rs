//! `/docs`: the OpenAPI document as one HTML page, rendered on the server
//! (no CDN, no JavaScript), so it works wherever the API does.

use serde_json::Value;

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn text(value: &Value, key: &str) -> String {
    value
        .get(key)
        .and_then(Value::as_str)
        .map(escape)
        .unwrap_or_default()
}

/// The page for `openapi`.
pub fn render(openapi: &utoipa::openapi::OpenApi) -> String {
    let doc = serde_json::to_value(openapi).unwrap_or_default();
    let mut html = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>idlemeter usage API</title>\
         <style>body{font:15px/1.45 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}\
         h2{margin-top:2.2rem;border-bottom:1px solid #ddd}code{background:#f4f4f4;padding:0 .25rem}\
         .m{display:inline-block;min-width:4rem;font-weight:700}table{border-collapse:collapse;margin:.4rem 0}\
         td,th{border:1px solid #ddd;padding:.2rem .5rem;text-align:left;vertical-align:top}</style></head><body>",
    );
    let info = &doc["info"];
    html += &format!(
        "<h1>{} <small>v{}</small></h1><p>{}</p><p>Machine-readable: <a href=\"/openapi.json\">/openapi.json</a></p>",
        text(info, "title"),
        text(info, "version"),
        text(info, "description")
    );
    if let Some(paths) = doc["paths"].as_object() {
        for (path, item) in paths {
            let Some(operations) = item.as_object() else {
                continue;
            };
            for (method, operation) in operations {
                if !["get", "post", "put", "delete", "patch"].contains(&method.as_str()) {
                    continue;
                }
                html += &format!(
                    "<h2><span class=\"m\">{}</span> <code>{}</code></h2><p>{}</p>",
                    method.to_uppercase(),
                    escape(path),
                    text(operation, "summary")
                );
                if let Some(parameters) = operation["parameters"].as_array() {
                    html += "<table><tr><th>parameter</th><th>in</th><th>required</th><th>description</th></tr>";
                    for parameter in parameters {
                        html += &format!(
                            "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>",
                            text(parameter, "name"),
                            text(parameter, "in"),
                            if parameter["required"].as_bool() == Some(true) {
                                "yes"
                            } else {
                                "no"
                            },
                            text(parameter, "description")
                        );
                    }
                    html += "</table>";
                }
                if let Some(body) = operation["requestBody"]["content"]["application/json"]
                    ["schema"]["$ref"]
                    .as_str()
                {
                    html += &format!(
                        "<p>Body: <code>{}</code></p>",
                        escape(body.rsplit('/').next().unwrap_or(body))
                    );
                }
                if let Some(responses) = operation["responses"].as_object() {
                    let codes: Vec<String> = responses.keys().map(|code| escape(code)).collect();
                    html += &format!("<p>Responses: {}</p>", codes.join(", "));
                }
            }
        }
    }
    html += "</body></html>";
    html
}
