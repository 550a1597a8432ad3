//! `cargo xtask docs` (also run by `cargo xtask lint`): the documentation
//! checked offline, README.md and every Markdown file under docs/.
//!
//! - **Links.** Every relative link names a file or directory that exists
//!   inside the repository, and every `#anchor` (in the same file or in
//!   another Markdown file) names a heading there, slugged the way GitHub
//!   slugs headings, or an explicit `<a id="...">`. Links with a scheme
//!   (`https:`, `mailto:`) are not followed: the check needs no network.
//! - **Code blocks.** Every fenced block says what it shows (a language
//!   after the fence; `text` for output and layouts), and indented code
//!   blocks are refused, because they cannot say it. A block that shows a
//!   command or a policy (`sh`, `bash`, `shell`, `console`, `yaml`, `yml`)
//!   is either exercised by a test or marked as not run, with a word after
//!   the language in [`ATTRIBUTES`]: ```` ```yaml policy ````,
//!   ```` ```sh illustrative ````. The tests behind each word are the unit
//!   tests in `portguard/src/cli/doc_blocks.rs`, which read the same files.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Component, Path, PathBuf},
};

use pulldown_cmark::{CodeBlockKind, Event, Options, Parser, Tag, TagEnd};

/// Words a fenced block may carry after its language, what each promises,
/// and the languages it goes with. NB: `portguard/src/cli/doc_blocks.rs`
/// tests what the first four promise; keep the two in step.
pub const ATTRIBUTES: [(&str, &str, &[&str]); 5] = [
    (
        "policy",
        "a whole policy file: `portguard check` finds no error in it",
        &["yaml", "yml"],
    ),
    (
        "cli",
        "each `portguard ...` command in it is accepted by the real command-line parser",
        &["sh", "bash", "shell", "console"],
    ),
    (
        "synopsis",
        "usage lines: every `--flag` named after `portguard VERB` is a flag of that verb",
        &["text"],
    ),
    (
        "check-output",
        "a `portguard check` run in a fixture directory: every line of output shown (but `...`) \
         is what the real check prints, in order",
        &["console"],
    ),
    (
        "illustrative",
        "shown for reading, not run by any test (needs a cluster, systemd as PID 1, a live agent, \
         or shows a run on another machine)",
        &[],
    ),
];

/// Languages whose blocks show a command or a policy: they need a word
/// from [`ATTRIBUTES`].
const RUNNABLE: [&str; 6] = ["sh", "bash", "shell", "console", "yaml", "yml"];

/// The Markdown files checked: README.md and docs/**/*.md, sorted.
pub fn files(root: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "md") {
                out.push(p);
            }
        }
    }
    let mut out = vec![root.join("README.md")];
    walk(&root.join("docs"), &mut out);
    out.sort();
    out
}

/// GitHub's anchor for a heading: lower case; letters, digits, `-` and `_`
/// kept, spaces turned into `-`, everything else dropped.
pub fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// What one Markdown file offers and asks for.
#[derive(Debug, Default)]
pub struct Parsed {
    /// Anchors its headings (and `<a id>`s) define.
    pub anchors: BTreeSet<String>,
    /// (line, destination) of every link and image.
    pub links: Vec<(usize, String)>,
    /// Problems found in the file itself (code blocks).
    pub problems: Vec<(usize, String)>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Explicit anchors in raw HTML: `id="x"` or `name="x"`.
fn html_anchors(html: &str, out: &mut BTreeSet<String>) {
    for key in ["id=\"", "name=\""] {
        let mut rest = html;
        while let Some(i) = rest.find(key) {
            rest = &rest[i + key.len()..];
            if let Some(end) = rest.find('"') {
                out.insert(rest[..end].to_owned());
                rest = &rest[end..];
            }
        }
    }
}

/// Check one code block's info string; `None` when it is fine.
pub fn block_problem(info: &str) -> Option<String> {
    let mut words = info.split_whitespace();
    let Some(lang) = words.next() else {
        return Some(
            "a fenced code block without a language: say what it shows (`text` for output or a \
             layout, `sh`/`console` for commands, `yaml policy` for a policy)"
                .to_owned(),
        );
    };
    let attrs: Vec<&str> = words.collect();
    for a in &attrs {
        match ATTRIBUTES.iter().find(|(name, ..)| name == a) {
            None => {
                return Some(format!(
                    "unknown word `{a}` after ```{lang}: the checker knows {}",
                    ATTRIBUTES.map(|(n, ..)| n).join(", ")
                ));
            }
            Some((name, _, langs)) if !langs.is_empty() && !langs.contains(&lang) => {
                return Some(format!(
                    "`{name}` goes with {} blocks, not `{lang}`",
                    langs.join("/")
                ));
            }
            Some(_) => {}
        }
    }
    if RUNNABLE.contains(&lang) && attrs.is_empty() {
        return Some(format!(
            "a `{lang}` block shows a command or a policy: have a test exercise it (a word after \
             the language: policy, cli, check-output; see xtask/src/docs.rs), or mark it as not \
             run: ```{lang} illustrative"
        ));
    }
    None
}

/// Parse one Markdown text.
pub fn parse(text: &str) -> Parsed {
    let mut out = Parsed::default();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut heading: Option<String> = None;
    let opts = Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH | Options::ENABLE_TASKLISTS;
    for (event, range) in Parser::new_ext(text, opts).into_offset_iter() {
        match event {
            Event::Start(Tag::Heading { .. }) => heading = Some(String::new()),
            Event::End(TagEnd::Heading(_)) => {
                let base = slug(&heading.take().unwrap_or_default());
                let n = seen.entry(base.clone()).or_insert(0);
                let anchor = if *n == 0 {
                    base.clone()
                } else {
                    format!("{base}-{n}")
                };
                *n += 1;
                out.anchors.insert(anchor);
            }
            Event::Text(t) | Event::Code(t) => {
                if let Some(h) = heading.as_mut() {
                    h.push_str(&t);
                }
            }
            Event::Html(h) | Event::InlineHtml(h) => html_anchors(&h, &mut out.anchors),
            Event::Start(Tag::Link { dest_url, .. } | Tag::Image { dest_url, .. }) => {
                out.links
                    .push((line_of(text, range.start), dest_url.into_string()));
            }
            Event::Start(Tag::CodeBlock(kind)) => {
                let line = line_of(text, range.start);
                match kind {
                    CodeBlockKind::Indented => out.problems.push((
                        line,
                        "an indented code block: use a fenced one with a language".to_owned(),
                    )),
                    CodeBlockKind::Fenced(info) => {
                        if let Some(p) = block_problem(&info) {
                            out.problems.push((line, p));
                        }
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// `a/b/../c` without touching the file system; `None` if it climbs above
/// the start.
fn normalize(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    Some(out)
}

/// Every problem in the documentation under `root`, one line each
/// (`file:line: message`).
pub fn check(root: &Path) -> Vec<String> {
    let files = files(root);
    let mut parsed: BTreeMap<PathBuf, Parsed> = BTreeMap::new();
    let mut out = Vec::new();
    for f in &files {
        match std::fs::read_to_string(f) {
            Ok(text) => {
                parsed.insert(f.clone(), parse(&text));
            }
            Err(e) => out.push(format!("{}: cannot read: {e}", f.display())),
        }
    }
    let rel = |p: &Path| p.strip_prefix(root).unwrap_or(p).display().to_string();
    for (f, p) in &parsed {
        for (line, msg) in &p.problems {
            out.push(format!("{}:{line}: {msg}", rel(f)));
        }
        for (line, dest) in &p.links {
            if dest.contains("://") || dest.starts_with("mailto:") {
                continue;
            }
            let (path, anchor) = match dest.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (dest.as_str(), None),
            };
            let target = if path.is_empty() {
                f.clone()
            } else if path.starts_with('/') {
                out.push(format!(
                    "{}:{line}: link `{dest}` is absolute: make it relative to this file",
                    rel(f)
                ));
                continue;
            } else {
                let dir = f.parent().unwrap_or(root);
                let Some(t) = normalize(&dir.join(path)).filter(|t| t.starts_with(root)) else {
                    out.push(format!(
                        "{}:{line}: link `{dest}` leaves the repository",
                        rel(f)
                    ));
                    continue;
                };
                if !t.exists() {
                    out.push(format!(
                        "{}:{line}: link `{dest}`: {} does not exist",
                        rel(f),
                        rel(&t)
                    ));
                    continue;
                }
                t
            };
            let Some(anchor) = anchor else { continue };
            if target.extension().is_none_or(|x| x != "md") {
                continue;
            }
            // A Markdown file outside the checked set is parsed for its
            // anchors only.
            let found = match parsed.get(&target) {
                Some(t) => t.anchors.contains(anchor),
                None => parse(&std::fs::read_to_string(&target).unwrap_or_default())
                    .anchors
                    .contains(anchor),
            };
            if !found {
                out.push(format!(
                    "{}:{line}: link `{dest}`: {} has no heading with the anchor `#{anchor}`",
                    rel(f),
                    rel(&target)
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headings_are_slugged_as_github_does() {
        assert_eq!(
            slug("No start window: runtime hooks"),
            "no-start-window-runtime-hooks"
        );
        assert_eq!(
            slug("Events: the event log (schema version 1)"),
            "events-the-event-log-schema-version-1"
        );
        assert_eq!(slug("`portguard why`"), "portguard-why");
        assert_eq!(
            slug("1b. A process no policy governs"),
            "1b-a-process-no-policy-governs"
        );
        let p = parse("# A\n## A\n<a id=\"x\"></a>\n`# not a heading`\n");
        assert_eq!(
            p.anchors,
            ["a", "a-1", "x"].map(str::to_owned).into_iter().collect()
        );
    }

    #[test]
    fn command_and_policy_blocks_must_be_tested_or_marked() {
        assert!(block_problem("yaml policy").is_none());
        assert!(block_problem("sh illustrative").is_none());
        assert!(block_problem("console illustrative cli").is_none());
        assert!(block_problem("json").is_none());
        assert!(block_problem("text synopsis").is_none());
        assert!(block_problem("").unwrap().contains("without a language"));
        assert!(block_problem("sh").unwrap().contains("illustrative"));
        assert!(block_problem("yaml").unwrap().contains("illustrative"));
        assert!(
            block_problem("yaml polcy")
                .unwrap()
                .contains("unknown word")
        );
        assert!(block_problem("sh policy").unwrap().contains("goes with"));
        let p = parse("text\n\n    indented\n\n```\nbare\n```\n\n```sh\nls\n```\n");
        let lines: Vec<usize> = p.problems.iter().map(|(l, _)| *l).collect();
        assert_eq!(lines, [3, 5, 9], "{:?}", p.problems);
    }

    #[test]
    fn broken_links_and_anchors_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("docs")).unwrap();
        std::fs::write(
            root.join("README.md"),
            "# Top\n[ok](docs/a.md#part) [bad](docs/a.md#nope) [gone](docs/b.md)\n\
             [self](#top) [selfbad](#bottom) [web](https://example.com/x#y) [up](../x)\n",
        )
        .unwrap();
        std::fs::write(
            root.join("docs/a.md"),
            "# A\n## Part\n[back](../README.md#top)\n",
        )
        .unwrap();
        let problems = check(root);
        assert_eq!(problems.len(), 4, "{problems:#?}");
        assert!(problems[0].contains("README.md:2: link `docs/a.md#nope`"));
        assert!(problems[1].contains("docs/b.md does not exist"));
        assert!(problems[2].contains("`#bottom`"));
        assert!(problems[3].contains("leaves the repository"));
    }
}
