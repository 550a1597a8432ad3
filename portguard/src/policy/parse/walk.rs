//! The checker's context and its typed reads of raw YAML nodes: a mapping
//! with known keys, a string, one of a fixed set of values. Every read that
//! fails records a [`Diagnostic`] (line, column, field path) and carries on,
//! so one pass reports every problem.
//!
//! Owns [`Cx`] and the node helpers the other checks share. May import the
//! policy model's [`Diagnostic`] and the YAML tree; nothing else.

use crate::policy::{
    Diagnostic,
    yaml::{Kind, Node},
};

#[derive(Default)]
pub(super) struct Cx {
    pub(super) diags: Vec<Diagnostic>,
    /// The file's named ranges, known before any port list is read.
    pub(super) ranges: std::collections::BTreeMap<String, (u16, u16)>,
}

impl Cx {
    pub(super) fn err(&mut self, node: &Node, field: &str, message: impl Into<String>) {
        self.diags.push(Diagnostic {
            line: node.pos.line,
            column: node.pos.column,
            field: field.to_owned(),
            message: message.into(),
        });
    }

    /// Entries of a mapping node, or an error. Unknown keys are reported.
    pub(super) fn mapping<'n>(
        &mut self,
        node: &'n Node,
        field: &str,
        known: &[&str],
    ) -> Option<Vec<(&'n str, &'n Node, &'n Node)>> {
        let Kind::Map(entries) = &node.kind else {
            self.err(
                node,
                field,
                format!("expected a mapping, found {}", node.type_name()),
            );
            return None;
        };
        let mut out = Vec::new();
        for (k, v) in entries {
            let Kind::Scalar { text, .. } = &k.kind else {
                self.err(k, field, "mapping keys must be plain strings");
                continue;
            };
            if !known.contains(&text.as_str()) {
                let path = join(field, text);
                self.err(
                    k,
                    &path,
                    format!(
                        "unknown key `{text}` (expected one of: {})",
                        known.join(", ")
                    ),
                );
                continue;
            }
            out.push((text.as_str(), k, v));
        }
        Some(out)
    }

    pub(super) fn string(&mut self, node: &Node, field: &str) -> Option<String> {
        match &node.kind {
            Kind::Scalar { text, .. } if !node.is_null() => Some(text.clone()),
            _ => {
                self.err(
                    node,
                    field,
                    format!("expected a string, found {}", node.type_name()),
                );
                None
            }
        }
    }

    pub(super) fn choice<T: Copy>(
        &mut self,
        node: &Node,
        field: &str,
        options: &[(&str, T)],
    ) -> Option<T> {
        let text = self.string(node, field)?;
        if let Some((_, v)) = options.iter().find(|(name, _)| *name == text) {
            return Some(*v);
        }
        let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
        self.err(
            node,
            field,
            format!(
                "unknown value `{text}` (expected one of: {})",
                names.join(", ")
            ),
        );
        None
    }
}

/// The scalar value of `key` in a mapping node, if present.
pub(super) fn peek_scalar<'n>(node: &'n Node, key: &str) -> Option<(String, &'n Node)> {
    let Kind::Map(entries) = &node.kind else {
        return None;
    };
    entries.iter().find_map(|(k, v)| match (&k.kind, &v.kind) {
        (Kind::Scalar { text: kt, .. }, Kind::Scalar { text, .. }) if kt == key => {
            Some((text.clone(), v))
        }
        _ => None,
    })
}

pub(super) fn join(field: &str, key: &str) -> String {
    if field.is_empty() {
        key.to_owned()
    } else {
        format!("{field}.{key}")
    }
}
