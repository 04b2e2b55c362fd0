//! The configuration keys the documentation names exist: every backticked key in README.md
//! (`server.shards`, `max_write_buffer`, `slow_consumer = "drop"`, `[[listener.websocket]]`) and
//! every key of a TOML snippet in it is checked against the schema, taken from the serialized
//! configuration itself; and every key of the schema is documented in `config/shardnet.toml`.

use std::collections::BTreeSet;

use shardnet::config::{
    AuthConfig, Config, ListenerConfig, PublicKeyConfig, ServiceKind, TlsConfig, TlsVersion,
    WsRouteConfig, DEFAULT_TOML,
};

/// Backticked snake_case names in README.md that are not configuration keys, with what they
/// are. A new one fails the test until it is added here (or corrected, like `log_level` was).
const NOT_CONFIG_KEYS: &[(&str, &str)] = &[
    ("tcp_rmem", "kernel sysctl"),
    ("tcp_wmem", "kernel sysctl"),
    ("ip_local_port_range", "kernel sysctl"),
    ("nf_conntrack_max", "kernel sysctl"),
    ("tcp_child_ehash_entries", "kernel sysctl"),
    ("epoll_ctl", "system call"),
    ("sched_setattr", "system call"),
    ("sched_runtime", "a field of the kernel's struct sched_attr"),
    ("process_backlog", "a kernel function (perf)"),
    ("json_u64", "a function of the bench client (perf)"),
    (
        "rps_cpus",
        "a file of /sys/class/net (receive packet steering)",
    ),
    ("sock_def_readable", "a kernel function (perf)"),
    ("prometheus_client", "Python library"),
    ("may_minihttp", "Rust crate"),
    ("send_timeout", "nginx directive"),
    ("require_tool", "test helper in tests/common"),
    ("rust_crypto", "jsonwebtoken's crypto backend feature"),
    ("not_yet_valid", "a token failure reason"),
    ("too_large", "a token failure reason"),
    ("unknown_key", "a token failure reason"),
    ("missing_key", "an API key refusal"),
    ("wrong_key", "an API key refusal"),
    ("topic_not_allowed", "an API key refusal"),
    (
        "service_counters",
        "the key of /stats that lists services' own counters",
    ),
    ("server_no_context_takeover", "RFC 7692 extension parameter"),
    ("client_no_context_takeover", "RFC 7692 extension parameter"),
    ("server_max_window_bits", "RFC 7692 extension parameter"),
    ("client_max_window_bits", "RFC 7692 extension parameter"),
    (
        "reload",
        "the `[reload]` marker in config/shardnet.toml's comments",
    ),
];

fn not_config(name: &str) -> bool {
    NOT_CONFIG_KEYS.iter().any(|(k, _)| *k == name) || is_counter(name)
}

/// The engine's counters are named in the README as they appear in `/metrics` and `/stats`.
fn is_counter(name: &str) -> bool {
    let shard = shardnet::stats::ShardSnapshot::default();
    let acceptor = shardnet::stats::AcceptorSnapshot::default();
    let deflate = shardnet::service::deflate::DeflateSnapshot::default();
    shard.fields().iter().any(|f| f.0 == name)
        || acceptor.fields().iter().any(|f| f.0 == name)
        || deflate.fields().iter().any(|f| f.0 == name)
        || matches!(name, "dead_shards" | "control_failures")
}

/// A file name such as `listener.rs` or `config/shardnet.toml` is not a dotted key.
fn is_file_name(s: &str) -> bool {
    [
        ".rs", ".md", ".toml", ".sh", ".c", ".py", ".lua", ".yaml", ".json", ".svg",
    ]
    .iter()
    .any(|ext| s.ends_with(ext))
}

/// The schema: every table and dotted key (array elements elided: `listener.websocket.path`).
struct Schema {
    tables: BTreeSet<String>,
    keys: BTreeSet<String>,
}

impl Schema {
    fn new() -> Schema {
        // One HTTP listener with one route, and one public key: every key of every section
        // appears when printed.
        let config = Config {
            listeners: vec![ListenerConfig {
                name: "http".into(),
                service: ServiceKind::Http,
                websocket: vec![WsRouteConfig::default()],
                tls: Some(TlsConfig {
                    cert: "cert.pem".into(),
                    key: "key.pem".into(),
                    client_ca: Some("ca.pem".into()),
                    min_version: TlsVersion::Tls12,
                    handshake_timeout: std::time::Duration::from_secs(10),
                }),
                ..ListenerConfig::default()
            }],
            auth: AuthConfig {
                public_keys: vec![PublicKeyConfig::default()],
                ..AuthConfig::default()
            },
            // A broker kind other than "none", so that every [broker] key is printed.
            broker: shardnet::config::BrokerConfig {
                kind: shardnet::config::BrokerKind::Redis,
                url: shardnet::config::BrokerUrl::new("redis://127.0.0.1:6379").unwrap(),
                ..Default::default()
            },
            ..Config::default()
        };
        let table: toml::Table = toml::from_str(&config.to_toml()).unwrap();
        let mut schema = Schema {
            tables: BTreeSet::new(),
            keys: BTreeSet::new(),
        };
        schema.walk("", &table);
        assert!(schema.keys.contains("listener.websocket.max_topics"));
        assert!(schema.keys.contains("listener.tls.client_ca"));
        assert!(schema.keys.contains("auth.public_key.kid"));
        assert!(schema.keys.contains("broker.publish_timeout"));
        schema
    }

    fn walk(&mut self, prefix: &str, table: &toml::Table) {
        for (k, v) in table {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            let sub = match v {
                toml::Value::Table(t) => Some(t),
                toml::Value::Array(a) => a.first().and_then(toml::Value::as_table),
                _ => None,
            };
            match sub {
                Some(t) => {
                    self.tables.insert(path.clone());
                    self.walk(&path, t);
                }
                None => {
                    self.keys.insert(path);
                }
            }
        }
    }

    fn is_table(&self, name: &str) -> bool {
        self.tables.contains(name)
    }

    /// Whether `leaf` is the last part of some key.
    fn has_leaf(&self, leaf: &str) -> bool {
        self.tables_with(leaf).next().is_some()
    }

    /// The tables that have `leaf` as a key or a sub-table (`""` for the top level).
    fn tables_with<'a>(&'a self, leaf: &'a str) -> impl Iterator<Item = String> + 'a {
        self.keys.iter().chain(&self.tables).filter_map(move |k| {
            let (table, l) = k.rsplit_once('.').unwrap_or(("", k));
            (l == leaf).then(|| table.to_string())
        })
    }

    /// `key = value` as it would appear inside `table`, as a file that only deserializes (no
    /// cross-key checks: a fragment is not a whole configuration).
    fn fragment(table: &str, assignment: &str) -> String {
        match table {
            "" => assignment.to_string(),
            "listener" => format!("[[listener]]\n{assignment}\n"),
            "listener.websocket" => {
                format!("[[listener]]\nservice = \"http\"\n[[listener.websocket]]\n{assignment}\n")
            }
            // cert and key are required: the fragment gives them unless it is about them.
            "listener.tls" => {
                let mut table = String::from("[[listener]]\n[listener.tls]\n");
                for required in ["cert", "key"] {
                    if !assignment.starts_with(&format!("{required} ")) {
                        table.push_str(&format!("{required} = \"x.pem\"\n"));
                    }
                }
                format!("{table}{assignment}\n")
            }
            "auth.public_key" => format!("[[auth.public_key]]\n{assignment}\n"),
            t => format!("[{t}]\n{assignment}\n"),
        }
    }
}

/// `listener[1].websocket[0].path` → `listener.websocket.path`.
fn without_indices(path: &str) -> String {
    let mut out = String::new();
    let mut depth = 0;
    for c in path.chars() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && s.starts_with(|c: char| c.is_ascii_lowercase())
}

/// A dotted path of identifiers, indices allowed: `server.shards`, `listener[0].addr`.
fn is_dotted(s: &str) -> bool {
    let plain = without_indices(s);
    plain.contains('.') && plain.split('.').all(is_identifier)
}

/// What README.md says about configuration keys, each with its line for the failure message.
#[derive(Default)]
struct Mentions {
    /// Inline code spans, outside fenced blocks.
    spans: Vec<(usize, String)>,
    /// Fenced ```toml blocks.
    toml_blocks: Vec<(usize, String)>,
}

fn mentions(readme: &str) -> Mentions {
    let mut m = Mentions::default();
    let mut fence: Option<(usize, bool, String)> = None;
    for (n, line) in readme.lines().enumerate() {
        let n = n + 1;
        if let Some(info) = line.trim_start().strip_prefix("```") {
            match fence.take() {
                Some((start, true, block)) => m.toml_blocks.push((start, block)),
                Some(_) => {}
                None => fence = Some((n, info.trim() == "toml", String::new())),
            }
            continue;
        }
        if let Some((_, _, block)) = &mut fence {
            block.push_str(line);
            block.push('\n');
            continue;
        }
        // Odd pieces between backticks are code spans (README lines keep their spans whole).
        for (i, piece) in line.split('`').enumerate() {
            if i % 2 == 1 {
                m.spans.push((n, piece.to_string()));
            }
        }
    }
    assert!(fence.is_none(), "README.md has an unclosed code fence");
    m
}

/// Every problem with one code span; empty when it names real keys (or no key at all).
fn check_span(schema: &Schema, span: &str) -> Vec<String> {
    let s = span.trim();
    let mut problems = Vec::new();
    if is_file_name(s) {
        return problems;
    }
    // A table header: `[server]`, `[[listener.websocket]]`.
    if let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        let name = inner.trim_start_matches('[').trim_end_matches(']');
        if (is_identifier(name) || is_dotted(name)) && !not_config(name) {
            if !schema.is_table(name) {
                problems.push(format!("`{s}`: there is no table `{name}`"));
            }
            return problems;
        }
    }
    // An assignment: `slow_consumer = "drop"`, `server.balance = "reuseport"`.
    if let Some((key, value)) = s.split_once('=') {
        let plain = without_indices(key.trim());
        let (table, leaf) = plain.rsplit_once('.').unwrap_or(("", &plain));
        let first = plain.split('.').next().unwrap_or("");
        let foreign = !(is_identifier(&plain) || is_dotted(&plain)) // `Type=notify`
            || (!table.is_empty() && !schema.is_table(first)) // `net.ipv4.x = 1`
            || not_config(&plain);
        if foreign {
            return problems;
        }
        let tables: Vec<String> = if table.is_empty() {
            schema.tables_with(leaf).collect()
        } else if schema.keys.contains(&plain) || schema.is_table(&plain) {
            vec![table.to_string()]
        } else {
            Vec::new()
        };
        let assignment = format!("{leaf} = {}", value.trim());
        let errors: Vec<String> = tables
            .iter()
            .filter_map(|t| toml::from_str::<Config>(&Schema::fragment(t, &assignment)).err())
            .map(|e| e.message().to_string())
            .collect();
        if tables.is_empty() {
            problems.push(format!("`{s}`: there is no key `{plain}`"));
        } else if errors.len() == tables.len() {
            problems.push(format!("`{s}`: not a valid value: {}", errors[0]));
        }
        return problems;
    }
    // A dotted key whose first part is a table of ours: `server.max_connections`.
    if is_dotted(s) {
        let plain = without_indices(s);
        let first = plain.split('.').next().unwrap_or("");
        if schema.is_table(first) && !schema.keys.contains(&plain) && !schema.is_table(&plain) {
            problems.push(format!("`{s}`: there is no key `{plain}`"));
        }
        return problems;
    }
    // A bare snake_case name: a key somewhere in the schema, or a known non-key.
    if is_identifier(s) && s.contains('_') {
        let known = not_config(s) || s.starts_with("shardnet_");
        if !known && !schema.has_leaf(s) && !schema.is_table(s) {
            problems.push(format!(
                "`{s}` is not a configuration key (if it is not meant as one, add it to \
                 NOT_CONFIG_KEYS)"
            ));
        }
    }
    problems
}

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap()
}

#[test]
fn every_config_key_the_readme_names_exists() {
    let schema = Schema::new();
    let m = mentions(&readme());
    let mut problems = Vec::new();
    for (line, span) in &m.spans {
        for p in check_span(&schema, span) {
            problems.push(format!("README.md:{line}: {p}"));
        }
    }
    for (line, block) in &m.toml_blocks {
        if let Err(e) = toml::from_str::<Config>(block) {
            problems.push(format!(
                "README.md:{line}: the TOML block does not fit the schema: {}",
                e.message()
            ));
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
    // The README does name keys (a scan that found none would pass vacuously).
    let checked = m
        .spans
        .iter()
        .filter(|(_, s)| is_dotted(s) && schema.is_table(s.split('.').next().unwrap_or("")))
        .count();
    assert!(
        checked >= 10,
        "only {checked} dotted keys found in README.md"
    );
}

#[test]
fn the_checker_refuses_what_is_not_in_the_schema() {
    let schema = Schema::new();
    for bad in [
        "log_level",
        "server.log_level",
        "limits.nosuch",
        "[listeners]",
        "[[listener.routes]]",
        "slow_consumer = \"later\"",
        "balance = \"random\"",
        "server.shards = 0",
        "listener = [{ name = \"x\", addr = \"nowhere\" }]",
        "min_version = \"1.1\"",
        "listener.tls.ca",
    ] {
        assert!(!check_span(&schema, bad).is_empty(), "`{bad}` passed");
    }
    for good in [
        "log.level",
        "server.max_connections",
        "listener[0].websocket[1].path",
        "[[listener.websocket]]",
        "[limits]",
        "max_write_buffer",
        "slow_consumer = \"drop\"",
        "balance = \"reuseport\"",
        "reuse_port = true",
        "net.ipv4.tcp_migrate_req = 1",
        "listener = [{ name = \"x\", addr = \"127.0.0.1:0\" }]",
        "server.shards = 4",
        "tcp_wmem",
        "shardnet_ws_dropped_total",
        "min_version = \"1.3\"",
        "handshake_timeout = \"5s\"",
        "cert = \"/etc/shardnet/cert.pem\"",
        "[listener.tls]",
        "listener[0].tls.client_ca",
        "service_panics",
        "listener.rs",
        "/healthz",
        "cargo test",
    ] {
        assert_eq!(check_span(&schema, good), Vec::<String>::new(), "`{good}`");
    }
    let m = mentions("a `b`\n```toml\n[server]\nlog_level = \"info\"\n```\n");
    assert_eq!(m.spans, vec![(1, "b".to_string())]);
    assert!(toml::from_str::<Config>(&m.toml_blocks[0].1).is_err());
}

#[test]
fn every_schema_key_is_documented_in_the_embedded_default() {
    let schema = Schema::new();
    let missing: Vec<&String> = schema
        .keys
        .iter()
        .filter(|k| {
            let leaf = k.rsplit('.').next().unwrap_or(k);
            !DEFAULT_TOML
                .lines()
                .map(|l| l.trim_start().trim_start_matches('#').trim_start())
                .any(|l| l.starts_with(&format!("{leaf} ")))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "config/shardnet.toml documents no line for {missing:?}"
    );
}
