use super::*;

#[test]
fn field_value_finds_whole_keys_only() {
    let cpu_stat = b"usage_usec 1234\nuser_usec 1000\nsystem_usec 234\n";
    assert_eq!(field_value(cpu_stat, "usage_usec"), Some(1234));
    assert_eq!(field_value(cpu_stat, "system_usec"), Some(234));
    assert_eq!(field_value(cpu_stat, "usage"), None);
    assert_eq!(field_value(b"populated 1\nfrozen 1\n", "frozen"), Some(1));
}

#[test]
fn net_dev_sums_every_interface_but_loopback() {
    let text = b"Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    lo:  500 5 0 0 0 0 0 0  500 5 0 0 0 0 0 0\n  eth0: 10728 14 0 0 0 0 0 0 3758 9 0 0 0 0 0 0\n  eth1: 2 1 0 0 0 0 0 0 40 1 0 0 0 0 0 0\n";
    assert_eq!(
        parse_net_dev(text),
        Some(vec![
            ("eth0".to_owned(), 10_728, 3_758),
            ("eth1".to_owned(), 2, 40)
        ])
    );
    assert_eq!(
        parse_net_dev(b"h\nh\n  eth0: 1 2\n"),
        None,
        "a short line is refused"
    );
}

#[test]
fn detail_files_are_read_on_detail_ticks_and_repeated_between() {
    let root = tempfile::tempdir().expect("tempdir");
    fake_cgroup(root.path(), "acme.a", 1, false);
    let v2 = root.path().join("v2/acme.a");
    let psi = |total: u64| {
        format!("some avg10=0.00 avg60=0.00 avg300=0.00 total={total}\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=1\n")
    };
    std::fs::write(v2.join("cpu.pressure"), psi(11)).expect("write");
    std::fs::write(v2.join("memory.pressure"), psi(22)).expect("write");
    std::fs::write(v2.join("io.pressure"), psi(33)).expect("write");
    std::fs::write(v2.join("memory.peak"), "4096\n").expect("write");
    std::fs::write(
        v2.join("io.stat"),
        "8:0 rbytes=100 wbytes=10 rios=1 wios=1 dbytes=0 dios=0\n8:16 rbytes=5 wbytes=1 rios=1 wios=1 dbytes=0 dios=0\n",
    )
    .expect("write");
    let mut reader = CgroupReader::new(fake_layout(root.path()));
    let mut readings = Vec::new();
    reader.read_node(&mut readings).expect("reads");
    let expected = SampleDetail {
        cpu_pressure_usec: 11,
        mem_pressure_usec: 22,
        io_pressure_usec: 33,
        mem_peak_bytes: 4096,
        io_read_bytes: 105,
        io_write_bytes: 11,
        ..SampleDetail::default()
    };
    assert_eq!(readings[0].detail, expected);
    std::fs::write(v2.join("cpu.pressure"), psi(99)).expect("write");
    for _ in 1..DETAIL_EVERY {
        reader.read_node(&mut readings).expect("reads");
        assert_eq!(
            readings[0].detail, expected,
            "repeated between detail ticks"
        );
    }
    reader.read_node(&mut readings).expect("reads");
    assert_eq!(
        readings[0].detail.cpu_pressure_usec, 99,
        "reread on the next detail tick"
    );
}

#[test]
fn block_io_falls_back_to_v1_blkio_where_v2_has_no_io_stat() {
    let root = tempfile::tempdir().expect("tempdir");
    fake_cgroup(root.path(), "acme.a", 1, false);
    let blkio = root.path().join("v1-blkio/acme.a");
    std::fs::create_dir_all(&blkio).expect("mkdir");
    std::fs::write(
        blkio.join("blkio.throttle.io_service_bytes"),
        "8:0 Read 4096\n8:0 Write 512\n8:0 Total 4608\nTotal 4608\n",
    )
    .expect("write");
    let mut reader = CgroupReader::new(fake_layout(root.path()));
    let mut readings = Vec::new();
    reader.read_node(&mut readings).expect("reads");
    let detail = readings[0].detail;
    assert_eq!((detail.io_read_bytes, detail.io_write_bytes), (4_096, 512));
}

#[test]
fn pressure_and_io_stat_parsers_take_the_right_numbers() {
    assert_eq!(
        pressure_total(b"some avg10=1.00 avg60=0.50 avg300=0.10 total=12345\nfull avg10=0 avg60=0 avg300=0 total=7\n"),
        Some(12_345)
    );
    assert_eq!(pressure_total(b"full avg10=0 total=7\n"), None);
    assert_eq!(io_stat_bytes(b""), (0, 0));
    assert_eq!(
        blkio_service_bytes(b"8:0 Read 4096\n8:0 Write 512\n8:0 Sync 1\n8:0 Async 2\n8:0 Total 4608\n8:16 Read 4\nTotal 4612\n"),
        (4_100, 512)
    );
    assert_eq!(
        io_stat_bytes(b"259:0 rbytes=7 wbytes=9 rios=1 wios=2 dbytes=100 dios=1\n"),
        (7, 9)
    );
}

#[test]
fn interface_rises_never_count_a_vanished_or_new_interface_twice() {
    let last: HashMap<String, (u64, u64)> = [
        ("eth0".to_owned(), (1_000, 100)),
        ("eth1".to_owned(), (5_000, 500)),
    ]
    .into();
    // eth0 rose, eth1 went away, veth9 appeared with old counters.
    let now = [
        ("eth0".to_owned(), 1_500, 130),
        ("veth9".to_owned(), 90_000, 9_000),
    ];
    assert_eq!(interface_rises(&last, &now), (500, 30));
    // eth0 was reset (recreated under the same name): all of it is new.
    assert_eq!(
        interface_rises(&last, &[("eth0".to_owned(), 200, 10)]),
        (200, 10)
    );
}

fn fake_layout(root: &Path) -> CgroupLayout {
    CgroupLayout {
        v2_parent: root.join("v2"),
        v1_memory_parent: root.join("v1"),
        v1_cpuacct_parent: root.join("v1-cpuacct"),
        v1_freezer_parent: root.join("v1-freezer"),
        v1_blkio_parent: root.join("v1-blkio"),
        labels_dir: root.join("labels"),
        activity_dir: root.join("activity"),
    }
}

fn fake_cgroup(root: &Path, name: &str, usage_usec: u64, frozen: bool) {
    let v2 = root.join("v2").join(name);
    std::fs::create_dir_all(&v2).expect("mkdir");
    std::fs::write(v2.join("cpu.stat"), format!("usage_usec {usage_usec}\n")).expect("write");
    std::fs::write(
        v2.join("cgroup.events"),
        format!("populated 1\nfrozen {}\n", u8::from(frozen)),
    )
    .expect("write");
}

#[test]
fn reader_maps_children_to_sandboxes_with_labels_memory_and_activity() {
    let root = tempfile::tempdir().expect("tempdir");
    fake_cgroup(root.path(), "acme.sbx-1", 42, false);
    fake_cgroup(root.path(), "not-a-sandbox", 1, false);
    let v1 = root.path().join("v1/acme.sbx-1");
    std::fs::create_dir_all(&v1).expect("mkdir");
    std::fs::write(v1.join("memory.usage_in_bytes"), "8192\n").expect("write");
    std::fs::create_dir_all(root.path().join("labels")).expect("mkdir");
    std::fs::write(
        root.path().join("labels/acme.sbx-1.toml"),
        "vcpu_milli = 250\n",
    )
    .expect("write");
    std::fs::create_dir_all(root.path().join("activity")).expect("mkdir");
    std::fs::write(root.path().join("activity/acme.sbx-1"), "exec_sessions 1\n").expect("write");

    let mut reader = CgroupReader::new(fake_layout(root.path()));
    let mut readings = Vec::new();
    reader.read_node(&mut readings).expect("reads");
    assert_eq!(readings.len(), 1);
    let reading = &readings[0];
    assert_eq!(reading.key.to_string(), "acme.sbx-1");
    assert_eq!(reading.cpu_usage_usec, 42);
    assert_eq!(reading.mem_used_bytes, Some(8192));
    assert_eq!(reading.allocation.vcpu_milli, 250);
    assert_eq!(reading.activity.exec_sessions, 1);
    assert!(!reading.frozen);
    assert_eq!(reader.unlabelled_sandboxes(), 0);
}

#[test]
fn a_changed_cgroup_events_file_is_read_again_at_the_next_tick() {
    let root = tempfile::tempdir().expect("tempdir");
    fake_cgroup(root.path(), "acme.a", 1, false);
    let mut reader = CgroupReader::new(fake_layout(root.path()));
    assert!(reader.events.is_some(), "inotify is available here");
    let mut readings = Vec::new();
    reader.read_node(&mut readings).expect("reads");
    assert!(!readings[0].frozen);
    reader.read_node(&mut readings).expect("reads");
    assert!(!readings[0].frozen);
    // As the kernel does when the cgroup freezes: rewrite the file in place.
    std::fs::write(
        root.path().join("v2/acme.a/cgroup.events"),
        "populated 1\nfrozen 1\n",
    )
    .expect("write");
    reader.read_node(&mut readings).expect("reads");
    assert!(readings[0].frozen, "the modify event makes it read again");
    reader.read_node(&mut readings).expect("reads");
    assert!(readings[0].frozen, "and the value is kept between events");
    assert_eq!(reader.watched.len(), 1);
    std::fs::remove_dir_all(root.path().join("v2/acme.a")).expect("rm");
    reader.read_node(&mut readings).expect("reads");
    assert!(readings.is_empty());
    assert!(
        reader.watched.is_empty(),
        "a vanished sandbox's watch is forgotten"
    );
}

#[test]
fn reader_notices_new_and_vanished_sandboxes() {
    let root = tempfile::tempdir().expect("tempdir");
    fake_cgroup(root.path(), "acme.a", 1, false);
    let mut reader = CgroupReader::new(fake_layout(root.path()));
    let mut readings = Vec::new();
    reader.read_node(&mut readings).expect("reads");
    assert_eq!(readings.len(), 1);
    fake_cgroup(root.path(), "acme.b", 1, true);
    std::fs::remove_dir_all(root.path().join("v2/acme.a")).expect("rm");
    reader.read_node(&mut readings).expect("reads");
    assert_eq!(readings.len(), 1);
    assert_eq!(readings[0].key.sandbox.as_str(), "b");
    assert!(readings[0].frozen);
    assert_eq!(readings[0].mem_used_bytes, None);
    assert_eq!(reader.unlabelled_sandboxes(), 1);
}
