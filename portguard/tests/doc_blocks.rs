//! The documentation's code blocks, exercised (no root needed). README.md
//! and docs/**/*.md mark each block that shows a command or a policy with a
//! word after its language; `cargo xtask docs` (xtask/src/docs.rs) refuses
//! one that has none. This file tests what the words promise:
//!
//! - ```` ```yaml policy ````: a whole policy file that `portguard check`
//!   accepts (no errors; warnings allowed, as `check` allows them). The
//!   README's is examples/policy.yaml, word for word.
//! - ```` ```sh cli ````, ```` ```console cli ````: each `portguard ...`
//!   command in the block (a `#`/`$` prompt line in a console block) is
//!   accepted by the real command-line parser. It is parsed, not run.
//! - ```` ```text synopsis ````: every `--flag` named after `portguard
//!   VERB` is a flag of that verb.
//! - ```` ```console check-output ````: `# cd DIR && portguard check ...`
//!   is run in DIR (from the repository root) with the real binary, and
//!   every output line shown, except `...`, is a line it prints, in order.
//!
//! Blocks marked `illustrative` only are not run (a cluster, systemd as PID
//! 1, a live agent, or a run on another machine).

use std::path::{Path, PathBuf};

use clap::{CommandFactory as _, Parser as _};
use portguard::cli::Cli;
use pulldown_cmark::{CodeBlockKind, Event, Options, Parser, Tag, TagEnd};

/// One fenced code block.
#[derive(Debug)]
struct Block {
    file: String,
    line: usize,
    lang: String,
    words: Vec<String>,
    text: String,
}

impl Block {
    fn has(&self, word: &str) -> bool {
        self.words.iter().any(|w| w == word)
    }

    fn at(&self) -> String {
        format!("{}:{}", self.file, self.line)
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// README.md and docs/**/*.md, as `cargo xtask docs` reads them.
fn markdown_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "md") {
                out.push(p);
            }
        }
    }
    let mut out = vec![root().join("README.md")];
    walk(&root().join("docs"), &mut out);
    out.sort();
    out
}

fn blocks() -> Vec<Block> {
    let mut out = Vec::new();
    for f in markdown_files() {
        let text = std::fs::read_to_string(&f).unwrap();
        let file = f.strip_prefix(root()).unwrap().display().to_string();
        let mut open: Option<Block> = None;
        for (event, range) in Parser::new_ext(&text, Options::ENABLE_TABLES).into_offset_iter() {
            match event {
                Event::Start(Tag::CodeBlock(CodeBlockKind::Fenced(info))) => {
                    let mut words = info.split_whitespace().map(str::to_owned);
                    open = Some(Block {
                        file: file.clone(),
                        line: text[..range.start].matches('\n').count() + 1,
                        lang: words.next().unwrap_or_default(),
                        words: words.collect(),
                        text: String::new(),
                    });
                }
                Event::Text(t) => {
                    if let Some(b) = open.as_mut() {
                        b.text.push_str(&t);
                    }
                }
                Event::End(TagEnd::CodeBlock) => out.extend(open.take()),
                _ => {}
            }
        }
    }
    out
}

fn blocks_with(word: &str) -> Vec<Block> {
    let b: Vec<Block> = blocks().into_iter().filter(|b| b.has(word)).collect();
    assert!(!b.is_empty(), "no ```... {word} block in the documentation");
    b
}

/// Shell words of one line, as sh splits them: quotes, backslashes, `#`
/// comments; `&&`, `||`, `|`, `;`, `>`, `<` are words of their own.
fn shell_words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    let flush = |word: &mut String, quoted: &mut bool, out: &mut Vec<String>| {
        if !word.is_empty() || *quoted {
            out.push(std::mem::take(word));
        }
        *quoted = false;
    };
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                quoted = true;
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                    word.push(c);
                }
            }
            '"' => {
                quoted = true;
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => word.extend(chars.next()),
                        c => word.push(c),
                    }
                }
            }
            '\\' => word.extend(chars.next()),
            '#' if word.is_empty() && !quoted => break,
            c if c.is_whitespace() => flush(&mut word, &mut quoted, &mut out),
            '&' | '|' | ';' | '>' | '<' => {
                flush(&mut word, &mut quoted, &mut out);
                let mut op = c.to_string();
                if chars.peek() == Some(&c) {
                    op.push(chars.next().unwrap());
                }
                out.push(op);
            }
            c => word.push(c),
        }
    }
    flush(&mut word, &mut quoted, &mut out);
    out
}

/// The commands of a block's lines: a console block's prompt lines (`# `
/// or `$ `), every line of a shell block (joined at a trailing `\`).
fn command_lines(b: &Block) -> Vec<String> {
    let mut out = Vec::new();
    let mut pending = String::new();
    for line in b.text.lines() {
        let line = if b.lang == "console" {
            match line.strip_prefix("# ").or_else(|| line.strip_prefix("$ ")) {
                Some(l) => l,
                None => continue,
            }
        } else {
            line
        };
        match line.strip_suffix('\\') {
            Some(l) => pending.push_str(l),
            None => out.push(std::mem::take(&mut pending) + line),
        }
    }
    out
}

/// The `portguard ...` invocations among `words` (split at `&&`, `|`, ...).
fn portguard_invocations(words: &[String]) -> Vec<Vec<String>> {
    words
        .split(|w| ["&&", "||", "|", ";", ">", ">>", "<"].contains(&w.as_str()))
        .filter(|seg| {
            seg.first()
                .is_some_and(|w| w == "portguard" || w.ends_with("/portguard"))
        })
        .map(<[String]>::to_vec)
        .collect()
}

#[test]
fn documented_policies_are_valid() {
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let blocks = blocks_with("policy");
    for (i, b) in blocks.iter().enumerate() {
        let path = dir.path().join(format!("{i}.yaml"));
        std::fs::write(&path, &b.text).unwrap();
        let report = portguard::cli::check::check(&path, None).unwrap();
        if !report.ok() {
            failures.push(format!("{}: {:#?}", b.at(), report.errors));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The README shows the quick start's policy: it is examples/policy.yaml
/// (after that file's header comment), so the two cannot drift apart.
#[test]
fn the_readme_policy_is_the_bundled_example() {
    let example = std::fs::read_to_string(root().join("examples/policy.yaml")).unwrap();
    let body: String = example
        .lines()
        .skip_while(|l| l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    let readme: Vec<Block> = blocks_with("policy")
        .into_iter()
        .filter(|b| b.file == "README.md")
        .collect();
    assert_eq!(readme.len(), 1, "{readme:#?}");
    assert_eq!(readme[0].text, body, "{}", readme[0].at());
}

#[test]
fn documented_commands_parse() {
    let mut failures = Vec::new();
    for b in blocks_with("cli") {
        let mut parsed = 0;
        for line in command_lines(&b) {
            for argv in portguard_invocations(&shell_words(&line)) {
                parsed += 1;
                if let Err(e) = Cli::try_parse_from(&argv) {
                    failures.push(format!("{}: `{}`: {e}", b.at(), argv.join(" ")));
                }
            }
        }
        if parsed == 0 {
            failures.push(format!(
                "{}: marked `cli` but shows no portguard command",
                b.at()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_synopsis_names_only_real_flags() {
    let mut failures = Vec::new();
    for b in blocks_with("synopsis") {
        // Lines starting with `portguard` open a command; indented lines
        // continue it.
        let mut commands: Vec<String> = Vec::new();
        for line in b.text.lines() {
            if line.starts_with("portguard ") {
                commands.push(line.to_owned());
            } else if let Some(last) = commands.last_mut() {
                last.push(' ');
                last.push_str(line);
            }
        }
        assert!(!commands.is_empty(), "{}: no `portguard` line", b.at());
        for c in commands {
            let mut cmd = Cli::command();
            let mut path = vec!["portguard".to_owned()];
            let mut words = c.split_whitespace().skip(1).peekable();
            while let Some(sub) = words.peek().and_then(|w| cmd.find_subcommand(w).cloned()) {
                path.push(words.next().unwrap().to_owned());
                cmd = sub;
            }
            assert!(path.len() > 1, "{}: `{c}` names no verb", b.at());
            for w in words {
                let Some(start) = w.find("--") else { continue };
                let flag: String = w[start + 2..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                    .collect();
                let known = ["help", "version"].contains(&flag.as_str())
                    || cmd.get_arguments().any(|a| a.get_long() == Some(&flag));
                if !known {
                    failures.push(format!(
                        "{}: `{}` has no flag --{flag}",
                        b.at(),
                        path.join(" ")
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_documented_check_output_is_what_check_prints() {
    for b in blocks_with("check-output") {
        let mut lines = b.text.lines();
        let first = lines.next().unwrap();
        let words = shell_words(first.strip_prefix("# ").unwrap_or(first));
        let [cd, dir, and, rest @ ..] = words.as_slice() else {
            panic!("{}: expected `# cd DIR && portguard check ...`", b.at());
        };
        assert_eq!((cd.as_str(), and.as_str()), ("cd", "&&"), "{}", b.at());
        assert_eq!(
            rest.get(..2),
            Some(&["portguard".into(), "check".into()][..])
        );
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_portguard"))
            .current_dir(root().join(dir))
            .args(&rest[1..])
            .output()
            .unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        // Each shown line, in order, among the real ones.
        let mut real = stdout.lines();
        for shown in lines.filter(|l| l.trim() != "...") {
            assert!(
                real.any(|r| r == shown),
                "{}: `portguard check` in {dir} does not print, at this point:\n{shown}\n\
                 it printed:\n{stdout}",
                b.at()
            );
        }
    }
}

#[test]
fn shell_words_split_as_sh_does() {
    assert_eq!(
        shell_words(r#"cd a && portguard x --y "b c" 'd e'  # note"#),
        ["cd", "a", "&&", "portguard", "x", "--y", "b c", "d e"]
    );
    assert_eq!(
        portguard_invocations(&shell_words("kubectl logs x | portguard events - > out")),
        [["portguard", "events", "-"]]
    );
    assert_eq!(shell_words("echo a#b ''"), ["echo", "a#b", ""]);
}
