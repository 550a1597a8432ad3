//! A small YAML tree that remembers where each node came from, built from
//! saphyr-parser's event stream. Scalars keep their raw text and whether they
//! were quoted, so the policy layer decides what `8080` vs `"8080"` mean, and
//! duplicate mapping keys are reported instead of silently overwritten (keys
//! compare by their text, however quoted or escaped).
//!
//! Owns the tree ([`Node`], [`Pos`]) and the parse entry points; the policy
//! parser and the manifest readers both read it. May import `std` and
//! saphyr-parser only.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, ScalarStyle};

/// 1-based position in the source text.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

/// Where each line of a text starts, with lines ended the way YAML ends them
/// (LF, CR and CRLF each end one). Positions are computed from the text
/// itself, never taken from the parser's own line counter: at the end of the
/// input saphyr's scanner reads past the last character (it pads the input
/// with blanks and counts line breaks there), so its marks can name a line
/// the file does not have.
struct Lines {
    /// Character index of the first character of each line.
    starts: Vec<usize>,
    /// Characters in the text.
    len: usize,
}

impl Lines {
    fn new(text: &str) -> Self {
        let mut starts = vec![0];
        let mut len = 0;
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            len += 1;
            if c == '\r' && chars.peek() == Some(&'\n') {
                chars.next();
                len += 1;
            }
            if c == '\r' || c == '\n' {
                starts.push(len);
            }
        }
        Self { starts, len }
    }

    /// The 1-based line and column of the character at `index` (counted in
    /// characters, as the parser's marks are). An index at or past the end
    /// names the end of the last line: the last character, which is that
    /// line's break when the text ends with one.
    fn pos(&self, index: usize) -> Pos {
        let index = index.min(self.len.saturating_sub(1));
        let line = self.starts.partition_point(|&s| s <= index);
        Pos {
            line,
            column: index - self.starts[line - 1] + 1,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A scalar: raw text, and whether it was written plain (unquoted).
    Scalar {
        text: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub pos: Pos,
    pub kind: Kind,
}

impl Node {
    /// A plain `~`, `null`, `Null`, `NULL` or empty scalar.
    pub fn is_null(&self) -> bool {
        matches!(&self.kind, Kind::Scalar { text, plain: true }
            if matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    /// Short description of the node's type for error messages.
    pub fn type_name(&self) -> &'static str {
        match &self.kind {
            _ if self.is_null() => "null",
            Kind::Scalar { .. } => "a scalar",
            Kind::Seq(_) => "a list",
            Kind::Map(_) => "a mapping",
        }
    }
}

/// A syntax error with its position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

enum Frame {
    Seq {
        pos: Pos,
        anchor: usize,
        items: Vec<Node>,
    },
    Map {
        pos: Pos,
        anchor: usize,
        entries: Vec<(Node, Node)>,
        pending_key: Option<Node>,
    },
}

/// Most nodes a policy document may hold, counting every node an alias
/// repeats (so a few kilobytes of nested aliases, the "billion laughs",
/// cannot exhaust memory): about 40,000 one-rule policies, in about 100 MiB.
pub const MAX_NODES: usize = 500_000;

/// Nodes in `node`'s tree, or `None` if more than `budget`.
fn size_within(node: &Node, budget: usize) -> Option<usize> {
    let mut n = 1usize;
    let check = |child: &Node, n: &mut usize| -> Option<()> {
        *n += size_within(child, budget.checked_sub(*n)?)?;
        (*n <= budget).then_some(())
    };
    match &node.kind {
        Kind::Scalar { .. } => {}
        Kind::Seq(items) => {
            for i in items {
                check(i, &mut n)?;
            }
        }
        Kind::Map(entries) => {
            for (k, v) in entries {
                check(k, &mut n)?;
                check(v, &mut n)?;
            }
        }
    }
    (n <= budget).then_some(n)
}

/// Parse one YAML document. An empty input yields `Ok(None)`.
pub fn parse(text: &str) -> Result<Option<Node>, SyntaxError> {
    parse_with_info(text).map(|(root, _)| root)
}

/// What the document used beyond plain nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ParseInfo {
    /// Anchors, aliases or tags appeared: text-local reasoning (incremental
    /// re-parsing) does not hold.
    pub non_local: bool,
}

/// [`parse`], also telling whether anchors, aliases or tags were used.
pub fn parse_with_info(text: &str) -> Result<(Option<Node>, ParseInfo), SyntaxError> {
    parse_inner(text, false).map(|(mut docs, info)| (docs.pop(), info))
}

/// Parse a stream of YAML documents separated by `---` (Kubernetes
/// manifests). Empty documents are skipped; anchors are per document; the
/// node budget covers the whole stream.
pub fn parse_stream(text: &str) -> Result<Vec<Node>, SyntaxError> {
    parse_inner(text, true).map(|(docs, _)| docs)
}

fn parse_inner(text: &str, multi: bool) -> Result<(Vec<Node>, ParseInfo), SyntaxError> {
    let mut docs: Vec<Node> = Vec::new();
    let mut info = ParseInfo::default();
    let mut parser = Parser::new_from_str(text);
    let lines = Lines::new(text);
    let mut stack: Vec<Frame> = Vec::new();
    let mut anchors: HashMap<usize, Node> = HashMap::new();
    let mut root: Option<Node> = None;
    let mut documents = 0usize;
    let mut duplicate: Option<SyntaxError> = None;
    let mut nodes = 0usize;
    let too_many = |pos: Pos| SyntaxError {
        pos,
        message: format!(
            "the document has more than {MAX_NODES} YAML nodes (counting what aliases repeat); \
             policy files and manifests are limited to that"
        ),
    };

    for ev in &mut parser {
        let (ev, span) = ev.map_err(|e| SyntaxError {
            pos: lines.pos(e.marker().index()),
            message: e.info().to_owned(),
        })?;
        let pos = lines.pos(span.start.index());
        if matches!(
            ev,
            Event::Scalar(..) | Event::SequenceStart(..) | Event::MappingStart(..)
        ) {
            nodes += 1;
        }
        let finished: Option<(Node, usize)> = match ev {
            Event::StreamStart | Event::StreamEnd | Event::Nothing => None,
            Event::DocumentEnd => {
                if let Some(doc) = root.take().filter(|d| !d.is_null()) {
                    docs.push(doc);
                }
                None
            }
            Event::DocumentStart(_) => {
                documents += 1;
                anchors.clear();
                if documents > 1 && !multi {
                    return Err(SyntaxError {
                        pos,
                        message: "a policy file holds one YAML document; found a second `---`"
                            .to_owned(),
                    });
                }
                None
            }
            Event::Alias(id) => {
                info.non_local = true;
                let anchored = anchors.get(&id).ok_or_else(|| SyntaxError {
                    pos,
                    message: "alias refers to an unknown anchor".to_owned(),
                })?;
                // Count before copying.
                let size = size_within(anchored, MAX_NODES - nodes).ok_or_else(|| too_many(pos))?;
                nodes += size;
                Some((anchored.clone(), 0))
            }
            Event::Scalar(..) | Event::SequenceStart(..) | Event::MappingStart(..)
                if nodes > MAX_NODES =>
            {
                return Err(too_many(pos));
            }
            Event::Scalar(value, style, anchor, tag) => Some((
                Node {
                    pos,
                    kind: Kind::Scalar {
                        text: value.into_owned(),
                        plain: {
                            info.non_local |= tag.is_some();
                            style == ScalarStyle::Plain
                        },
                    },
                },
                anchor,
            )),
            Event::SequenceStart(anchor, tag) => {
                info.non_local |= tag.is_some();
                stack.push(Frame::Seq {
                    pos,
                    anchor,
                    items: Vec::new(),
                });
                None
            }
            Event::MappingStart(anchor, tag) => {
                info.non_local |= tag.is_some();
                stack.push(Frame::Map {
                    pos,
                    anchor,
                    entries: Vec::new(),
                    pending_key: None,
                });
                None
            }
            Event::SequenceEnd => match stack.pop() {
                Some(Frame::Seq { pos, anchor, items }) => Some((
                    Node {
                        pos,
                        kind: Kind::Seq(items),
                    },
                    anchor,
                )),
                _ => unreachable_frame(pos)?,
            },
            Event::MappingEnd => match stack.pop() {
                Some(Frame::Map {
                    pos,
                    anchor,
                    entries,
                    ..
                }) => Some((
                    Node {
                        pos,
                        kind: Kind::Map(entries),
                    },
                    anchor,
                )),
                _ => unreachable_frame(pos)?,
            },
        };
        let Some((node, anchor)) = finished else {
            continue;
        };
        if anchor != 0 {
            info.non_local = true;
        }
        if anchor != 0 {
            anchors.insert(anchor, node.clone());
        }
        match stack.last_mut() {
            None => root = Some(node),
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map {
                entries,
                pending_key,
                ..
            }) => match pending_key.take() {
                None => *pending_key = Some(node),
                Some(key) => {
                    if duplicate.is_none()
                        && let Some((first, _)) = entries.iter().find(|(k, _)| same_key(k, &key))
                    {
                        duplicate = Some(SyntaxError {
                            pos: key.pos,
                            message: format!(
                                "duplicate key {} (first given on line {})",
                                describe_key(&key),
                                first.pos.line
                            ),
                        });
                    }
                    entries.push((key, node));
                }
            },
        }
    }
    if let Some(e) = duplicate {
        return Err(e);
    }
    if let Some(doc) = root.filter(|d| !d.is_null()) {
        docs.push(doc);
    }
    Ok((docs, info))
}

impl Node {
    /// Shift every position by `lines` (for a node parsed from a slice).
    pub fn shift_lines(&mut self, lines: usize) {
        self.pos.line += lines;
        match &mut self.kind {
            Kind::Scalar { .. } => {}
            Kind::Seq(items) => items.iter_mut().for_each(|n| n.shift_lines(lines)),
            Kind::Map(entries) => entries.iter_mut().for_each(|(k, v)| {
                k.shift_lines(lines);
                v.shift_lines(lines);
            }),
        }
    }
}

/// Whether two mapping keys are one key. A scalar key is its value: the text
/// once quotes, escapes, folding and chomping are resolved, whatever its style
/// (`bind`, `'bind'`, `"bi\x6ed"` and a `|-` block holding `bind` are one key),
/// as every reader of the tree looks keys up by that text alone. Telling them
/// apart would let a later, differently quoted key silently win. Other keys
/// compare as whole nodes.
fn same_key(a: &Node, b: &Node) -> bool {
    match (&a.kind, &b.kind) {
        (Kind::Scalar { text: a, .. }, Kind::Scalar { text: b, .. }) => a == b,
        (a, b) => a == b,
    }
}

fn describe_key(key: &Node) -> String {
    match &key.kind {
        Kind::Scalar { text, .. } => format!("`{text}`"),
        _ => key.type_name().to_owned(),
    }
}

fn unreachable_frame<T>(pos: Pos) -> Result<T, SyntaxError> {
    Err(SyntaxError {
        pos,
        message: "unbalanced YAML structure".to_owned(),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn scalar(n: &Node) -> (&str, bool) {
        match &n.kind {
            Kind::Scalar { text, plain } => (text.as_str(), *plain),
            other => panic!("not a scalar: {other:?}"),
        }
    }

    #[test]
    fn alias_bombs_and_huge_documents_are_refused_within_the_node_budget() {
        // "Billion laughs": each level repeats the previous one ten times.
        let mut doc = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let refs = vec![format!("*a{}", i - 1); 10].join(", ");
            doc.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
        }
        let err = parse(&doc).unwrap_err();
        assert!(err.message.contains("YAML nodes"), "{err:?}");
        // Plain size: one node past the budget.
        let big = format!("[{}]", vec!["1"; MAX_NODES].join(","));
        assert!(parse(&big).unwrap_err().message.contains("YAML nodes"));
        let fits = format!("[{}]", vec!["1"; MAX_NODES - 1].join(","));
        assert!(parse(&fits).is_ok());
        // Aliases within the budget still work.
        let ok = parse("a: &x [1, 2]\nb: *x\n").unwrap().unwrap();
        let Kind::Map(entries) = &ok.kind else {
            panic!()
        };
        assert_eq!(entries[0].1, entries[1].1);
    }

    #[test]
    fn positions_are_one_based() {
        let root = parse("a:\n  - 1\n  - \"x\"\n").unwrap().unwrap();
        let Kind::Map(entries) = &root.kind else {
            panic!()
        };
        let (k, v) = &entries[0];
        assert_eq!(k.pos, Pos { line: 1, column: 1 });
        let Kind::Seq(items) = &v.kind else { panic!() };
        assert_eq!(items[1].pos, Pos { line: 3, column: 5 });
        assert_eq!(scalar(&items[0]), ("1", true));
        assert_eq!(scalar(&items[1]), ("x", false));
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let e = parse("a: 1\nb: 2\na: 3\n").unwrap_err();
        assert_eq!(e.pos.line, 3);
        assert!(e.message.contains("duplicate key `a`"), "{}", e.message);
        assert!(e.message.contains("line 1"), "{}", e.message);
    }

    /// A key is its text: how it is quoted, escaped or written (plain,
    /// quoted, block scalar) does not make it another key.
    #[test]
    fn duplicate_keys_are_found_whatever_the_quoting() {
        // (text, line of the second `bind`; a block scalar's is where its
        // text starts)
        let cases = [
            ("bind: 1\n\"bind\": 2\n", 2),
            ("'bind': 1\nbind: 2\n", 2),
            ("\"bind\": 1\n'bind': 2\n", 2),
            ("bind: 1\n\"bi\\x6ed\": 2\n", 2),
            ("bind: 1\n\"bi\\u006ed\": 2\n", 2),
            ("bind: 1\n\"bi\\U0000006ed\": 2\n", 2),
            ("bind: 1\n? |-\n  bind\n: 2\n", 3),
            ("bind: 1\n? >-\n  bind\n: 2\n", 3),
            // An alias copies its anchored node, position included.
            ("x: &k bind\nbind: 1\n*k : 2\n", 1),
        ];
        for (text, line) in cases {
            let e = parse(text).expect_err(text);
            assert_eq!(e.pos.line, line, "{text:?}: {e:?}");
            assert!(
                e.message.contains("duplicate key `bind`"),
                "{text:?}: {}",
                e.message
            );
        }
        // Positions: the second occurrence, and the first one's line.
        let e = parse("a: 0\nbind: 1\nc: 2\n\"bi\\x6ed\": 3\n").unwrap_err();
        assert_eq!(e.pos, Pos { line: 4, column: 1 }, "{e:?}");
        assert_eq!(e.message, "duplicate key `bind` (first given on line 2)");
        // In a flow mapping too, as a policy entry is often written.
        let e = parse("{name: a, bind: [8080], \"bind\": [\"1-65535\"]}").unwrap_err();
        assert_eq!(
            e.pos,
            Pos {
                line: 1,
                column: 25
            },
            "{e:?}"
        );
        assert_eq!(e.message, "duplicate key `bind` (first given on line 1)");
    }

    #[test]
    fn distinct_keys_in_any_quoting_are_not_duplicates() {
        let root = parse("bind: 1\n\"connect\": 2\n'name': 3\n\"bin\\x64s\": 4\n")
            .unwrap()
            .unwrap();
        let Kind::Map(entries) = &root.kind else {
            panic!()
        };
        let keys: Vec<(&str, bool)> = entries.iter().map(|(k, _)| scalar(k)).collect();
        assert_eq!(
            keys,
            [
                ("bind", true),
                ("connect", false),
                ("name", false),
                ("binds", false)
            ]
        );
        // Non-scalar keys are kept as before: two equal-looking flow lists
        // written in two places are two nodes.
        assert!(parse("? [a]\n: 1\n? [a]\n: 2\n").is_ok());
    }

    #[test]
    fn aliases_copy_the_anchored_node() {
        let root = parse("x: &p [1, 2]\ny: *p\n").unwrap().unwrap();
        let Kind::Map(entries) = &root.kind else {
            panic!()
        };
        assert_eq!(entries[0].1.kind, entries[1].1.kind);
    }

    /// The fuzz input of issue 13 (tabs and a lone CR): saphyr's scanner
    /// reports "simple key expected" at line 7 of this 6-line text.
    pub(crate) const PAST_THE_END: &str = "services:\n  a:\n    network000-801\t\t\t\t\t\t\t\t\t\t\t\r\t\t\t\t#\t\t\t\t\t\t\t\t\t\t\tetadata:\n  name\t\t\t: api\n  namesp\t*ace";

    #[test]
    fn syntax_errors_at_the_end_point_at_the_last_line() {
        let e = parse(PAST_THE_END).unwrap_err();
        assert_eq!(e.message, "simple key expected");
        assert_eq!(
            e.pos,
            Pos {
                line: 6,
                column: 13
            },
            "the last character of line 6"
        );
        // The same error after a final line break still names the last line,
        // with any line ending.
        for end in ["\n", "\r\n", "\r"] {
            let e = parse(&format!("{PAST_THE_END}{end}")).unwrap_err();
            assert_eq!(e.pos.line, 6, "ending {end:?}: {e:?}");
        }
        // An unterminated flow sequence, reported at the end of the input.
        let e = parse("a: [1,\r\n  2\r\n").unwrap_err();
        assert_eq!(e.pos.line, 2, "{e:?}");
    }

    #[test]
    fn positions_count_cr_lf_and_crlf_and_characters() {
        let text = "a: 1\rb: 2\r\nc: 3\nd: é\ne: 5\n";
        let Some(Node {
            kind: Kind::Map(entries),
            ..
        }) = parse(text).unwrap()
        else {
            panic!("a map")
        };
        let lines: Vec<usize> = entries.iter().map(|(k, _)| k.pos.line).collect();
        assert_eq!(lines, [1, 2, 3, 4, 5]);
        // Columns count characters, not bytes.
        let e = parse("k: \"é\" x\n").unwrap_err();
        assert_eq!(e.pos, Pos { line: 1, column: 8 }, "{e:?}");
    }

    #[test]
    fn syntax_errors_have_positions() {
        let e = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(e.pos.line >= 1);
        assert!(!e.message.is_empty());
    }

    #[test]
    fn empty_input_is_none() {
        assert_eq!(parse("").unwrap(), None);
        assert_eq!(parse("# only a comment\n").unwrap(), None);
    }

    #[test]
    fn streams_hold_many_documents_with_their_own_lines() {
        let docs = parse_stream("---\na: 1\n---\n# nothing\n---\nb: &x 2\nc: *x\n...\n---\nd: 3\n")
            .unwrap();
        assert_eq!(docs.len(), 3);
        assert_eq!(docs[1].pos.line, 6);
        assert_eq!(docs[2].pos.line, 10);
        // Anchors do not leak from one document into the next.
        assert!(parse_stream("a: &x 1\n---\nb: *x\n").is_err());
        assert!(parse_stream("").unwrap().is_empty());
    }

    #[test]
    fn second_document_is_an_error() {
        let e = parse("a: 1\n---\nb: 2\n").unwrap_err();
        assert!(e.message.contains("one YAML document"), "{}", e.message);
    }
}
