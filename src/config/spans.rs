//! Where every key of a parsed configuration file is: a map from a dotted path
//! (`server.shards`, `listener[1].websocket[0].path`, `server.cores[2]`) to its place in the
//! source, built once per parse from the TOML library's own spans.
//!
//! Because the spans come from the parser, every way of writing a key is covered alike: table
//! headers, arrays of tables, inline tables (`listener = [{ name = "x" }]`), dotted keys
//! (`server.shards = 4` at the top level) and arrays of values. Building the map is one walk over
//! the document; finding the key under an error's offset is one pass over the map (only on an
//! error).

use std::collections::HashMap;
use std::ops::Range;

use toml_edit::{ImDocument, InlineTable, Item, Table, Value};

/// One key (or table, or array element) of the document.
#[derive(Debug, Clone)]
struct Entry {
    /// Where an error about this entry points: a table's header (`[server]`, the first
    /// `[[listener.websocket]]`), else the key, else (array elements) the value.
    at: usize,
    /// The key's own text, when the entry has a key.
    key: Option<Range<usize>>,
    /// From the key (or header) to the end of the value (or the table's last line).
    extent: Option<Range<usize>>,
}

/// The span of every key in one source text.
#[derive(Debug, Default)]
pub(super) struct Spans {
    entries: HashMap<String, Entry>,
}

impl Spans {
    pub(super) fn new(doc: &ImDocument<&str>) -> Spans {
        let mut spans = Spans::default();
        spans.table("", doc.as_table());
        spans
    }

    /// Whether the file spells out `path` (as opposed to leaving it to its default).
    pub(super) fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(path)
    }

    /// The byte offset an error about `path` points at: the key itself when the file has it,
    /// else the nearest enclosing table the file has (a default's table header), else the start.
    pub(super) fn at(&self, path: &str) -> usize {
        let mut p = path;
        loop {
            if let Some(e) = self.entries.get(p) {
                return e.at;
            }
            match parent(p) {
                Some(up) => p = up,
                None => return 0,
            }
        }
    }

    /// The dotted path of the key under byte `offset` (an error's span from the deserializer):
    /// the key whose own text holds the offset, else the smallest entry around it.
    pub(super) fn key_at(&self, offset: usize) -> Option<&str> {
        let holds = |r: &Option<Range<usize>>| r.as_ref().filter(|r| r.contains(&offset)).cloned();
        let by_key = self
            .entries
            .iter()
            .filter_map(|(p, e)| holds(&e.key).map(|r| (r.len(), p)))
            .min_by_key(|&(len, p)| (len, std::cmp::Reverse(p.len())));
        let found = by_key.or_else(|| {
            self.entries
                .iter()
                .filter_map(|(p, e)| holds(&e.extent).map(|r| (r.len(), p)))
                .min_by_key(|&(len, p)| (len, std::cmp::Reverse(p.len())))
        });
        found.map(|(_, p)| p.as_str())
    }

    fn insert(
        &mut self,
        path: String,
        at: usize,
        key: Option<Range<usize>>,
        value: Option<Range<usize>>,
    ) {
        let extent = match (&key, &value) {
            (Some(k), Some(v)) => Some(k.start.min(v.start)..k.end.max(v.end)),
            (k, v) => k.clone().or_else(|| v.clone()),
        };
        // Each path occurs once in the document tree (a key spelled twice is a syntax error the
        // parser already refused), so nothing is overwritten here.
        self.entries.insert(path, Entry { at, key, extent });
    }

    fn table(&mut self, prefix: &str, t: &Table) {
        for (k, item) in t.iter() {
            let key = t.key(k).and_then(|k| k.span());
            self.item(join(prefix, k), key, item);
        }
    }

    fn item(&mut self, path: String, key: Option<Range<usize>>, item: &Item) {
        let key_start = key.as_ref().map(|k| k.start);
        match item {
            Item::None => {}
            Item::Value(v) => self.value(path, key, v),
            Item::Table(t) => {
                // A `[header]` table has a span starting at its `[`; a dotted or implicit one
                // has none, and its key stands for it.
                let at = t.span().map(|s| s.start).or(key_start).unwrap_or(0);
                self.insert(path.clone(), at, key, t.span());
                self.table(&path, t);
            }
            Item::ArrayOfTables(a) => {
                let first = a.iter().next().and_then(|t| t.span()).map(|s| s.start);
                let at = first.or(key_start).unwrap_or(0);
                self.insert(path.clone(), at, key, a.span());
                for (i, t) in a.iter().enumerate() {
                    let element = format!("{path}[{i}]");
                    let span = t.span();
                    self.insert(
                        element.clone(),
                        span.as_ref().map_or(at, |s| s.start),
                        None,
                        span,
                    );
                    self.table(&element, t);
                }
            }
        }
    }

    fn value(&mut self, path: String, key: Option<Range<usize>>, v: &Value) {
        let at = key
            .as_ref()
            .map(|k| k.start)
            .or_else(|| v.span().map(|s| s.start))
            .unwrap_or(0);
        self.insert(path.clone(), at, key, v.span());
        match v {
            Value::InlineTable(t) => self.inline(&path, t),
            Value::Array(a) => {
                for (i, x) in a.iter().enumerate() {
                    self.value(format!("{path}[{i}]"), None, x);
                }
            }
            _ => {}
        }
    }

    fn inline(&mut self, prefix: &str, t: &InlineTable) {
        for (k, x) in t.iter() {
            let key = t.key(k).and_then(|k| k.span());
            self.value(join(prefix, k), key, x);
        }
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// `listener[1].websocket[0].path` → `listener[1].websocket[0]` → `listener[1].websocket` →
/// `listener[1]` → `listener` → none.
fn parent(path: &str) -> Option<&str> {
    if let Some(open) = path.strip_suffix(']').and_then(|p| p.rfind('[')) {
        return Some(&path[..open]);
    }
    path.rfind('.').map(|dot| &path[..dot])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spans(src: &str) -> Spans {
        Spans::new(&ImDocument::parse(src).unwrap())
    }

    /// The text at the place an error about `path` points to, up to the end of its line.
    fn text_at<'a>(src: &'a str, s: &Spans, path: &str) -> &'a str {
        src[s.at(path)..].lines().next().unwrap()
    }

    #[test]
    fn parents_walk_up_to_the_root() {
        assert_eq!(
            parent("listener[1].websocket[0].path"),
            Some("listener[1].websocket[0]")
        );
        assert_eq!(
            parent("listener[1].websocket[0]"),
            Some("listener[1].websocket")
        );
        assert_eq!(parent("listener[1].websocket"), Some("listener[1]"));
        assert_eq!(parent("listener[1]"), Some("listener"));
        assert_eq!(parent("listener"), None);
    }

    #[test]
    fn headers_arrays_of_tables_and_keys() {
        let src = "[server]\nshards = 2\ncores = [0, 1]\n\n[[listener]]\nname = \"a\"\n\
                   [[listener]]\nname = \"b\"\n[[listener.websocket]]\npath = \"/x\"\n";
        let s = spans(src);
        assert_eq!(text_at(src, &s, "server"), "[server]");
        assert_eq!(text_at(src, &s, "server.shards"), "shards = 2");
        assert_eq!(text_at(src, &s, "server.cores[1]"), "1]");
        assert_eq!(text_at(src, &s, "listener"), "[[listener]]");
        assert_eq!(text_at(src, &s, "listener[1]"), "[[listener]]");
        assert_eq!(text_at(src, &s, "listener[1].name"), "name = \"b\"");
        assert_eq!(
            text_at(src, &s, "listener[1].websocket"),
            "[[listener.websocket]]"
        );
        assert_eq!(
            text_at(src, &s, "listener[1].websocket[0].path"),
            "path = \"/x\""
        );
        // Absent keys point at their nearest table in the file; an absent table at the start.
        assert_eq!(
            text_at(src, &s, "listener[1].websocket[0].mode"),
            "[[listener.websocket]]"
        );
        assert_eq!(text_at(src, &s, "limits.idle_timeout"), "[server]");
        assert_eq!(s.at("limits.idle_timeout"), 0);
        assert!(s.contains("listener[0].name") && !s.contains("listener[0].addr"));
    }

    #[test]
    fn inline_tables_and_dotted_keys() {
        let src = "server.shards = 0\nlimits = { idle_timeout = \"1s\" }\n\
                   listener = [{ name = \"x\", addr = \"bad\" }]\n";
        let s = spans(src);
        assert_eq!(text_at(src, &s, "server"), "server.shards = 0");
        assert_eq!(text_at(src, &s, "server.shards"), "shards = 0");
        assert_eq!(
            text_at(src, &s, "limits.idle_timeout"),
            "idle_timeout = \"1s\" }"
        );
        assert_eq!(
            text_at(src, &s, "listener[0]"),
            "{ name = \"x\", addr = \"bad\" }]"
        );
        assert_eq!(text_at(src, &s, "listener[0].addr"), "addr = \"bad\" }]");
        let bad = src.find("\"bad\"").unwrap();
        assert_eq!(s.key_at(bad), Some("listener[0].addr"));
        assert_eq!(s.key_at(src.find('0').unwrap()), Some("server.shards"));
    }

    #[test]
    fn an_offset_on_a_header_key_names_that_key() {
        // `unknown field websocket` points at `websocket` inside the header: the key, not the
        // route table the header opens.
        let src = "[[listener]]\nname = \"x\"\n[[listener.websocket]]\npath = \"/a\"\n";
        let s = spans(src);
        let off = src.find("websocket").unwrap();
        assert_eq!(s.key_at(off), Some("listener[0].websocket"));
        assert_eq!(
            s.key_at(src.find("/a").unwrap()),
            Some("listener[0].websocket[0].path")
        );
    }
}
