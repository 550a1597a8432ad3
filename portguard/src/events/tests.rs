//! Unit tests of the event pipeline: decoding, enriching, the shared
//! address classifier, rotation and the writer.

use std::{
    path::PathBuf,
    time::{Duration, SystemTime},
};

use portguard_common::{EVENT_F_V4_MAPPED, IPPROTO_UDP};

use portguard_common::{Event, Family, Hook, VERDICT_DENY};
use serde_json::Value;

use super::*;
use crate::workload::cgroupfs::Hierarchy;

fn raw() -> Event {
    let mut comm = [0u8; 16];
    comm[..2].copy_from_slice(b"nc");
    Event {
        boot_ns: boottime_ns(),
        cgroup_id: 42,
        policy_cgroup_id: 41,
        pid_tgid: (100u64 << 32) | 101,
        uid_gid: (5u64 << 32) | 1000,
        policy_id: 7,
        addr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        port: 8080,
        hook: Hook::Bind6 as u8,
        verdict: VERDICT_DENY,
        family: Family::Ipv4 as u8,
        protocol: IPPROTO_UDP,
        flags: EVENT_F_V4_MAPPED,
        sock_kind: 0,
        comm,
        _reserved: 0,
        sock_cookie: 0,
    }
}

/// learn, the rule explanation and the kernel agree on what an address
/// means. The kernel programs classify with portguard-common's
/// classifier, whose answers this table pins down; the event a program
/// writes for the address is read back by `judged()` (explain) and by
/// `learn::seen`, which must give the same answer. A `connect()` to
/// `0.0.0.0` or `::` goes to this host: loopback for the kernel, and so
/// for both readers.
#[test]
fn learn_explain_and_the_kernel_classify_addresses_alike() {
    use std::{collections::BTreeSet, net::IpAddr};

    use portguard_common::{AddrClass, AddrRole, IPPROTO_TCP, VERDICT_AUDIT, classify_ip};
    // (address, loopback when bound, loopback as a destination, judged as IPv6)
    let table: [(&str, bool, bool, bool); 5] = [
        ("0.0.0.0", false, true, false),
        ("::", false, true, true),
        ("::ffff:127.0.0.1", true, true, false),
        ("127.0.0.2", true, true, false),
        ("::1", true, true, true),
    ];
    let mut names = PolicyNames::default();
    names.insert(7, "web");
    let mut h = Hierarchy::new(PathBuf::from("/nonexistent"));
    for (text, bound_lo, dest_lo, v6) in table {
        let ip: IpAddr = text.parse().unwrap();
        for (connect, want_lo) in [(false, bound_lo), (true, dest_lo)] {
            let what = format!("{text} ({})", if connect { "connect" } else { "bind" });
            let role = if connect {
                AddrRole::Destination
            } else {
                AddrRole::Local
            };
            // The kernel's answer: the classifier its programs call.
            let k = classify_ip(ip, role);
            assert_eq!(k.class == AddrClass::Loopback, want_lo, "kernel: {what}");
            assert_eq!(k.family == Family::Ipv6, v6, "kernel: {what}");
            // The event a program writes for it.
            let mut ev = raw();
            ev.hook = match (connect, ip.is_ipv6()) {
                (false, false) => Hook::Bind4,
                (false, true) => Hook::Bind6,
                (true, false) => Hook::Connect4,
                (true, true) => Hook::Connect6,
            } as u8;
            ev.verdict = VERDICT_AUDIT;
            ev.protocol = IPPROTO_TCP;
            ev.family = k.family as u8;
            ev.addr = k.addr;
            ev.flags = if k.v4_mapped { EVENT_F_V4_MAPPED } else { 0 };
            let r = enrich(&ev, &names, &mut h, "node-1");
            let j = r.judged();
            assert_eq!(j.loopback, want_lo, "explain: {what}: {r:?}");
            assert_eq!(j.ipv6, v6, "explain: {what}");
            let seen = crate::cli::learn::seen(&serde_json::to_value(&r).unwrap())
                .unwrap_or_else(|| panic!("learn skipped {what}"));
            assert_eq!(seen.loopback, want_lo, "learn: {what}: {r:?}");
            assert_eq!(
                seen.families,
                BTreeSet::from([if v6 { 6 } else { 4 }]),
                "learn: {what}"
            );
        }
    }
}

#[test]
fn decodes_and_enriches_with_the_contract_fields() {
    let ev = raw();
    // SAFETY: viewing a plain-data struct as bytes.
    let bytes = unsafe {
        std::slice::from_raw_parts(std::ptr::from_ref(&ev).cast::<u8>(), size_of::<Event>())
    };
    let ev = decode(bytes).unwrap();
    let mut names = PolicyNames::default();
    names.insert(7, "web");
    let mut h = Hierarchy::new(PathBuf::from("/nonexistent"));
    h.remember(42, "/demo/web/child");
    h.remember(41, "/demo/web");
    let r = enrich(&ev, &names, &mut h, "node-1");
    let v: Value = serde_json::to_value(&r).unwrap();
    for key in [
        "time",
        "verdict",
        "hook",
        "policy",
        "cgroup",
        "cgroup_id",
        "pid",
        "tid",
        "uid",
        "comm",
        "family",
        "protocol",
        "address",
        "port",
    ] {
        assert!(v.get(key).is_some(), "missing {key}: {v}");
    }
    assert_eq!(v["schema_version"], SCHEMA_VERSION);
    assert_eq!(v["host"], "node-1");
    assert_eq!(v["count"], 1);
    assert!(v.get("first_seen").is_none());
    assert_eq!(v["verdict"], "deny");
    assert_eq!(v["hook"], "bind6");
    assert_eq!(v["policy"], "web");
    assert_eq!(v["cgroup"], "/demo/web/child");
    assert_eq!(v["policy_cgroup"], "/demo/web");
    assert_eq!(v["pid"], 100);
    assert_eq!(v["tid"], 101);
    assert_eq!(v["uid"], 1000);
    assert_eq!(v["gid"], 5);
    assert_eq!(v["comm"], "nc");
    assert_eq!(v["family"], "ipv4");
    assert_eq!(v["protocol"], "udp");
    assert_eq!(v["address"], "::ffff:127.0.0.1");
    assert_eq!(v["port"], 8080);
    assert_eq!(v["v4_mapped"], true);
    assert!(v.get("dual_stack").is_none());
    // Time is now-ish.
    let t = humantime::parse_rfc3339(v["time"].as_str().unwrap()).unwrap();
    let age = SystemTime::now().duration_since(t).unwrap_or_default();
    assert!(age < Duration::from_secs(5), "{age:?}");
}

#[test]
fn short_or_corrupt_records_are_rejected() {
    assert!(matches!(decode(&[0u8; 10]), Err(DecodeError::Size { .. })));
    let mut ev = raw();
    ev.hook = 99;
    // SAFETY: viewing a plain-data struct as bytes.
    let bytes = unsafe {
        std::slice::from_raw_parts(std::ptr::from_ref(&ev).cast::<u8>(), size_of::<Event>())
    };
    assert!(matches!(decode(bytes), Err(DecodeError::Hook { hook: 99 })));
}

#[test]
fn the_log_file_rotates_by_size_and_keeps_n_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    let mut w = EventWriter::file(
        &path,
        Rotation {
            max_bytes: 200,
            keep: 2,
        },
    )
    .unwrap();
    let rec = |i: u64| LostRecord {
        schema_version: 1,
        time: "t".into(),
        host: "h".into(),
        lost: i,
        lost_total: i,
        since: None,
        until: None,
        agent_restarted: false,
        policies: Vec::new(),
    };
    // Each line is about 65 bytes: 4 lines per file before rotating.
    for i in 1..=20 {
        w.line(&rec(i)).unwrap();
    }
    w.flush().unwrap();
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    let current = read(&path);
    let one = read(&rotated(&path, 1));
    let two = read(&rotated(&path, 2));
    assert!(
        !rotated(&path, 3).exists(),
        "only two rotated files are kept"
    );
    for text in [&one, &two] {
        assert!(text.len() >= 200 && text.len() < 200 + 80, "{text}");
        for l in text.lines() {
            serde_json::from_str::<Value>(l).expect("whole lines only");
        }
    }
    // The newest lines are in the current file, the ones before in .1.
    assert!(
        current.lines().last().unwrap().contains(r#""lost":20"#),
        "{current}"
    );
    let first_of_one: Value = serde_json::from_str(one.lines().next().unwrap()).unwrap();
    let last_of_two: Value = serde_json::from_str(two.lines().last().unwrap()).unwrap();
    assert_eq!(
        first_of_one["lost"].as_u64().unwrap(),
        last_of_two["lost"].as_u64().unwrap() + 1
    );
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn ipv4_text_is_what_display_writes() {
    use std::net::Ipv4Addr;
    for b in 0..=255u8 {
        for octets in [
            [b, 0, 0, 0],
            [10, b, 100, 9],
            [1, 22, b, 255],
            [127, 0, 0, b],
        ] {
            assert_eq!(ipv4_text(octets), Ipv4Addr::from(octets).to_string());
        }
    }
}

#[test]
fn journal_field_names() {
    assert_eq!(journal_field("k8s_pod"), "PORTGUARD_K8S_POD");
    assert_eq!(journal_field("verdict"), "PORTGUARD_VERDICT");
}

#[test]
fn writer_emits_one_line_per_record() {
    let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut w = EventWriter::memory(buf.clone());
    w.line(&LostRecord {
        schema_version: 1,
        time: "t".into(),
        host: "h".into(),
        lost: 3,
        lost_total: 5,
        since: None,
        until: None,
        agent_restarted: false,
        policies: Vec::new(),
    })
    .unwrap();
    w.line(&LostRecord {
        schema_version: 1,
        time: "u".into(),
        host: "h".into(),
        lost: 1,
        lost_total: 6,
        since: None,
        until: None,
        agent_restarted: false,
        policies: Vec::new(),
    })
    .unwrap();
    let text = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(
        lines[0],
        r#"{"schema_version":1,"time":"t","host":"h","lost":3,"lost_total":5}"#
    );
}
