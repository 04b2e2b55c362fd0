//! Reading the TLS files a configuration names: the one check that touches the disk. It runs
//! after parsing (so [`Config::parse`] stays a function of the text alone), from `config check`,
//! at start-up and on SIGHUP. A file that cannot be used is a [`ConfigError`] located at its key
//! (`listener[1].tls.key`), naming the path and the reason; a key file's contents never appear.

use std::path::{Path, PathBuf};

use super::{spans, Config, ConfigError, ServiceKind, TlsVersion};
use crate::tls::{MinVersion, ServerTls, TlsSettings};

/// Every listener's TLS server side, in configuration order (`None`: a plain listener).
pub type ListenerTls = Vec<Option<ServerTls>>;

/// The ALPN protocol an HTTP listener answers (HTTP/1.1 only; a client offering only h2 is
/// refused in the handshake instead of failing later).
const HTTP_ALPN: &[u8] = b"http/1.1";

impl Config {
    /// What listener `i`'s TLS is built from, with relative paths taken from `base` (the
    /// configuration file's directory); `None` for a plain listener.
    pub fn tls_settings(&self, i: usize, base: &Path) -> Option<TlsSettings> {
        let l = self.listeners.get(i)?;
        let tls = l.tls.as_ref()?;
        let resolve = |p: &PathBuf| base.join(p);
        Some(TlsSettings {
            cert: resolve(&tls.cert),
            key: resolve(&tls.key),
            client_ca: tls.client_ca.as_ref().map(resolve),
            min_version: match tls.min_version {
                TlsVersion::Tls12 => MinVersion::Tls12,
                TlsVersion::Tls13 => MinVersion::Tls13,
            },
            alpn: match l.service {
                ServiceKind::Http => vec![HTTP_ALPN.to_vec()],
                ServiceKind::Echo => Vec::new(),
            },
        })
    }

    /// Reads the certificate, key and client CA of every TLS listener and builds its rustls
    /// configuration. `src` is the text this configuration was parsed from and `file` its name:
    /// errors are located in it, and relative paths are taken from `file`'s directory.
    pub fn load_tls(&self, src: &str, file: &str) -> Result<ListenerTls, ConfigError> {
        let base = base_dir(file);
        let mut out = Vec::with_capacity(self.listeners.len());
        for i in 0..self.listeners.len() {
            let Some(settings) = self.tls_settings(i, &base) else {
                out.push(None);
                continue;
            };
            match ServerTls::new(settings) {
                Ok(tls) => out.push(Some(tls)),
                Err(e) => return Err(tls_error(src, file, i, &e)),
            }
        }
        Ok(out)
    }
}

impl Config {
    /// SIGHUP: the TLS of every listener that has TLS both in `current` (what runs) and in this
    /// new configuration, rebuilt from the files this one names (ticket keys kept). Every file is
    /// checked before anything is returned, so a bad one changes nothing; nothing is applied
    /// here. Listeners without TLS on either side are `None` (that change needs a restart).
    pub fn reload_tls(
        &self,
        src: &str,
        file: &str,
        current: &ListenerTls,
    ) -> Result<ListenerTls, ConfigError> {
        let base = base_dir(file);
        let mut out = Vec::with_capacity(self.listeners.len());
        for i in 0..self.listeners.len() {
            let (Some(Some(running)), Some(settings)) =
                (current.get(i), self.tls_settings(i, &base))
            else {
                out.push(None);
                continue;
            };
            match running.reloaded(settings) {
                Ok(tls) => out.push(Some(tls)),
                Err(e) => return Err(tls_error(src, file, i, &e)),
            }
        }
        Ok(out)
    }
}

/// The directory relative TLS paths start from: the configuration file's own.
pub(super) fn base_dir(file: &str) -> PathBuf {
    Path::new(file)
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// `e` as a configuration error at listener `i`'s key for the file it is about.
pub fn tls_error(src: &str, file: &str, i: usize, e: &crate::tls::LoadError) -> ConfigError {
    let spans = toml_edit::ImDocument::parse(src)
        .map(|doc| spans::Spans::new(&doc))
        .unwrap_or_default();
    let key = format!("listener[{i}].tls.{}", e.file.key());
    super::invalid(src, file, spans.at(&key), key, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::testpki::Pki;

    fn listener(pki: &Pki, tls: &str) -> String {
        let _ = pki;
        format!("[[listener]]\nname = \"s\"\naddr = \"127.0.0.1:0\"\nservice = \"http\"\n{tls}")
    }

    fn located(src: &str, file: &str) -> (usize, String, String) {
        let c = Config::parse(src, file).unwrap();
        match c.load_tls(src, file).unwrap_err() {
            ConfigError::Invalid {
                line, key, reason, ..
            } => (line, key, reason),
            e => panic!("{e}"),
        }
    }

    #[test]
    fn tls_files_load_and_paths_are_relative_to_the_file() {
        let pki = Pki::new();
        let file = pki.dir.join("shardnet.toml").display().to_string();
        let src = listener(
            &pki,
            "tls = { cert = \"cert.pem\", key = \"key.pem\", client_ca = \"ca.pem\" }\n",
        );
        let c = Config::parse(&src, &file).unwrap();
        let tls = c.load_tls(&src, &file).unwrap();
        let s = tls[0].as_ref().unwrap().settings();
        assert_eq!(s.cert, pki.cert);
        assert_eq!(s.client_ca.as_deref(), Some(pki.ca.as_path()));
        assert_eq!(
            s.alpn,
            vec![b"http/1.1".to_vec()],
            "HTTP listeners answer ALPN"
        );
        // A plain listener has none; an echo listener takes TLS without ALPN.
        let src = format!(
            "{src}[[listener]]\nname = \"p\"\naddr = \"127.0.0.1:0\"\n\
             [[listener]]\nname = \"e\"\naddr = \"127.0.0.1:0\"\n\
             [listener.tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\nmin_version = \"1.3\"\n"
        );
        let c = Config::parse(&src, &file).unwrap();
        let tls = c.load_tls(&src, &file).unwrap();
        assert!(tls[1].is_none());
        let echo = tls[2].as_ref().unwrap().settings();
        assert!(echo.alpn.is_empty());
        assert_eq!(echo.min_version, MinVersion::Tls13);
    }

    #[test]
    fn unusable_files_name_file_line_and_key() {
        let pki = Pki::new();
        let file = pki.dir.join("conf.toml").display().to_string();
        let src = listener(
            &pki,
            "tls = { cert = \"cert.pem\", key = \"missing.pem\" }\n",
        );
        let (line, key, reason) = located(&src, &file);
        assert_eq!((line, key.as_str()), (5, "listener[0].tls.key"));
        assert!(
            reason.ends_with("missing.pem: cannot read: no such file"),
            "{reason}"
        );
        let e = Config::parse(&src, &file)
            .unwrap()
            .load_tls(&src, &file)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with(&format!("{file}:5:")), "{e}");

        // The key of another certificate, in a [listener.tls] table.
        let src = listener(
            &pki,
            "[listener.tls]\ncert = \"cert.pem\"\nkey = \"client-key.pem\"\n",
        );
        let (line, key, reason) = located(&src, &file);
        assert_eq!((line, key.as_str()), (7, "listener[0].tls.key"));
        assert!(
            reason.contains("does not match the certificate"),
            "{reason}"
        );

        // A bad PEM certificate, and a bad client CA.
        pki.file("bad.pem", "not pem at all");
        let src = listener(&pki, "tls = { cert = \"bad.pem\", key = \"key.pem\" }\n");
        let (_, key, reason) = located(&src, &file);
        assert_eq!(key, "listener[0].tls.cert");
        assert!(reason.contains("no certificate found"), "{reason}");
        let src = listener(
            &pki,
            "tls = { cert = \"cert.pem\", key = \"key.pem\", client_ca = \"bad.pem\" }\n",
        );
        assert_eq!(located(&src, &file).1, "listener[0].tls.client_ca");
    }

    #[test]
    fn tls_keys_are_checked_when_parsing() {
        let src = |tls: &str| {
            format!("[[listener]]\nname = \"s\"\naddr = \"127.0.0.1:0\"\ntls = {{ {tls} }}\n")
        };
        let err = |tls: &str| match Config::parse(&src(tls), "t.toml").unwrap_err() {
            ConfigError::Invalid { key, reason, .. } => (key, reason),
            e => panic!("{e}"),
        };
        let (key, reason) = err("cert = \"c\"");
        assert_eq!(key, "listener[0].tls");
        assert!(reason.contains("missing field `key`"), "{reason}");
        let (key, reason) = err("cert = \"c\", key = \"k\", min_version = \"1.1\"");
        assert_eq!(key, "listener[0].tls.min_version", "{reason}");
        let (key, _) = err("cert = \"c\", key = \"k\", handshake_timeout = \"0s\"");
        assert_eq!(key, "listener[0].tls.handshake_timeout");
        let (key, _) = err("cert = \"c\", key = \"k\", nosuch = 1");
        assert_eq!(key, "listener[0].tls.nosuch");
        let (key, _) = err("cert = \"\", key = \"k\"");
        assert_eq!(key, "listener[0].tls.cert");
        // What parses prints back the same, defaults filled in.
        let c = Config::parse(&src("cert = \"c.pem\", key = \"k.pem\""), "t").unwrap();
        let printed = c.to_toml();
        assert!(printed.contains("[listener.tls]"), "{printed}");
        assert!(printed.contains("min_version = \"1.2\""), "{printed}");
        assert!(printed.contains("handshake_timeout = \"10s\""), "{printed}");
        assert_eq!(Config::parse(&printed, "again").unwrap(), c);
    }
}
