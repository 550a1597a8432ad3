//! Re-parsing one edited policy entry (`incremental.rs`): it agrees with a
//! full parse, and an in-place reparse is undone by restore.

use super::*;

fn sample(n: usize) -> String {
    let mut s = String::from("# header comment\npolicies:\n");
    for i in 0..n {
        if i % 3 == 0 {
            s.push_str(&format!(
                "  - name: p{i}\n    cgroup: /c{i}\n    bind:\n      - ports: [{}, \"9000-9099\"]\n        protocol: tcp\n    # trailing comment {i}\n",
                1000 + i
            ));
        } else {
            s.push_str(&format!(
                "  - {{name: p{i}, cgroup: /c{i}, bind: [{{ports: [{}]}}], connect: []}}\n",
                1000 + i
            ));
        }
    }
    s
}

#[test]
fn an_edited_entry_is_reparsed_alone_and_matches_a_full_parse() {
    let text = sample(9);
    let prev = parse_policy_text(text.clone()).unwrap();
    // Change one port in a flow entry and in a block entry.
    for (from, to) in [("1004]", "2004]"), ("1003, ", "3003, 3004, ")] {
        let new = text.replacen(from, to, 1);
        let (p, how) = reparse_policy_text(&prev, new.clone()).unwrap();
        assert!(matches!(how, Reparse::Entry { .. }), "{how:?}");
        assert_eq!(p.file, parse_policy_str(&new).unwrap());
    }
    // Lines added inside an entry shift the lines of later entries.
    let new = text.replacen(
        "        protocol: tcp\n",
        "        protocol: tcp\n        family: ipv4\n\n",
        1,
    );
    let (p, how) = reparse_policy_text(&prev, new.clone()).unwrap();
    assert_eq!(how, Reparse::Entry { index: 0 });
    assert_eq!(p.file, parse_policy_str(&new).unwrap());
    // An invalid edit is reported at its position in the whole file.
    let new = text.replacen("1004]", "99999]", 1);
    let e = reparse_policy_text(&prev, new.clone()).unwrap_err();
    assert_eq!(e, parse_policy_str(&new).unwrap_err());
    assert_eq!(e[0].field, "policies[4].bind[0].ports[0]");
    // A new entry, or a name clash, takes the full path.
    let new = format!("{text}  - {{name: extra, cgroup: /extra}}\n");
    assert_eq!(reparse_policy_text(&prev, new).unwrap().1, Reparse::Full);
    let new = text.replacen("name: p4,", "name: p5,", 1);
    let e = reparse_policy_text(&prev, new).unwrap_err();
    assert!(e[0].message.contains("duplicate policy name"), "{e:?}");
    assert_eq!(
        reparse_policy_text(&prev, text).unwrap().1,
        Reparse::Unchanged
    );
}

#[test]
fn common_prefix_and_suffix_agree_with_byte_by_byte() {
    use crate::policy::parse::incremental::{common_prefix, common_suffix};
    let base: Vec<u8> = (0..2000u32).map(|i| (i % 251) as u8).collect();
    for (at, len_change) in [(0, 0), (1, 0), (255, 1), (256, -1), (1000, 7), (1999, 0)] {
        for tail_cut in [0usize, 1, 300] {
            let mut other = base.clone();
            other[at] ^= 0xff;
            if len_change > 0 {
                other.splice(at..at, std::iter::repeat_n(7, len_change as usize));
            } else if len_change < 0 {
                other.remove(at);
            }
            other.truncate(other.len() - tail_cut);
            let naive_prefix = base.iter().zip(&other).take_while(|(a, b)| a == b).count();
            let naive_suffix = base
                .iter()
                .rev()
                .zip(other.iter().rev())
                .take_while(|(a, b)| a == b)
                .count();
            assert_eq!(
                common_prefix(&base, &other),
                naive_prefix,
                "{at} {len_change}"
            );
            assert_eq!(
                common_suffix(&base, &other),
                naive_suffix,
                "{at} {len_change}"
            );
        }
    }
    assert_eq!(common_prefix(&base, &base), base.len());
    assert_eq!(common_suffix(&base, &base), base.len());
    assert_eq!(common_suffix(b"", b"abc"), 0);
}

/// In place, a re-parse gives what [`reparse_policy_text`] gives, and
/// restoring what it replaced gives back the previous parse exactly.
#[test]
fn an_in_place_reparse_is_undone_by_restore() {
    let text = sample(9);
    let prev = parse_policy_text(text.clone()).unwrap();
    let edits = [
        text.replacen("1004]", "2004]", 1),
        text.replacen("1003, ", "3003, 3004, ", 1),
        text.replacen(
            "        protocol: tcp\n",
            "        protocol: tcp\n        family: ipv4\n\n",
            1,
        ),
        format!("{text}  - {{name: extra, cgroup: /extra}}\n"),
        text.clone(),
    ];
    for new in edits {
        let mut p = prev.clone();
        let (how, replaced) = p.reparse(new.clone()).unwrap();
        let (q, how2) = reparse_policy_text(&prev, new.clone()).unwrap();
        assert_eq!(how, how2);
        assert_eq!(format!("{p:?}"), format!("{q:?}"));
        p.restore(replaced);
        assert_eq!(format!("{p:?}"), format!("{prev:?}"), "after {how:?}");
    }
    // An edit that does not parse leaves it as it was.
    let mut p = prev.clone();
    p.reparse(text.replacen("1004]", "99999]", 1)).unwrap_err();
    assert_eq!(format!("{p:?}"), format!("{prev:?}"));
}

/// Random edits: whatever path is taken, the result equals a full parse.
#[test]
fn reparse_always_agrees_with_a_full_parse() {
    let base = sample(12);
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    let pieces = [
        "",
        "\n",
        " ",
        "-",
        "  - ",
        "{",
        "}",
        "[",
        "]",
        ",",
        ":",
        "#",
        "\"",
        "'",
        "7",
        "80",
        "name: q",
        "ports: [1]",
        "\n    mode: audit",
        "\n  - {name: z, cgroup: /z}",
        "&a",
        "*a",
    ];
    let mut prev = parse_policy_text(base.clone()).unwrap();
    let mut agreed = (0, 0);
    for _ in 0..20000 {
        let mut new = prev.text.clone();
        let at = rnd(new.len() + 1);
        let del = rnd(4).min(new.len() - at);
        new.replace_range(at..at + del, pieces[rnd(pieces.len())]);
        let full = parse_policy_str(&new);
        match (reparse_policy_text(&prev, new.clone()), full) {
            (Ok((p, how)), Ok(f)) => {
                assert_eq!(p.file, f, "{how:?} after editing at {at}:\n{new}");
                let mut undone = p.clone();
                if let Ok((_, replaced)) = undone.reparse(prev.text.clone()) {
                    // Back to the previous text, then undone: the new parse.
                    undone.restore(replaced);
                    assert_eq!(format!("{undone:?}"), format!("{p:?}"));
                }
                if matches!(how, Reparse::Entry { .. }) {
                    agreed.0 += 1;
                }
                prev = p;
            }
            (Err(a), Err(b)) => {
                assert_eq!(a, b, "errors differ for:\n{new}");
                agreed.1 += 1;
            }
            (a, b) => panic!("disagree for:\n{new}\nreparse {a:?}\nfull {b:?}"),
        }
        if rnd(20) == 0 {
            prev = parse_policy_text(base.clone()).unwrap();
        }
    }
    assert!(agreed.0 > 500, "the entry path was exercised: {agreed:?}");
}
