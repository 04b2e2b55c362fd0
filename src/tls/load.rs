//! Reading a listener's certificate chain, private key and client CA from PEM files, and
//! building the rustls configuration every new handshake of that listener uses.
//!
//! Runs on the main thread: at start-up (`serve`), in `config check`, and on SIGHUP. A failure
//! names the file, its path and the reason; it never quotes a key file's contents (the reasons are
//! written here, not passed through from the PEM parser, whose messages can echo a line).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::ServerName;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{NoServerSessionStorage, ProducesTickets, WebPkiClientVerifier};
use rustls::{ClientConfig, RootCertStore, ServerConfig, SupportedProtocolVersion};

use super::conn::{TlsClient, TlsConn, TlsError};

/// The crypto provider, ring; see the crate README ("TLS") for why.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Which of a listener's files a [`LoadError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFile {
    Cert,
    Key,
    ClientCa,
}

impl TlsFile {
    /// The configuration key that names this file (`cert`, `key`, `client_ca`).
    pub fn key(self) -> &'static str {
        match self {
            TlsFile::Cert => "cert",
            TlsFile::Key => "key",
            TlsFile::ClientCa => "client_ca",
        }
    }
}

/// A file that cannot be used, and why. The reason never contains the file's bytes.
#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", path.display())]
pub struct LoadError {
    pub file: TlsFile,
    pub path: PathBuf,
    pub reason: String,
}

/// The oldest protocol version a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MinVersion {
    #[default]
    Tls12,
    Tls13,
}

impl MinVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            MinVersion::Tls12 => "1.2",
            MinVersion::Tls13 => "1.3",
        }
    }

    fn versions(self) -> &'static [&'static SupportedProtocolVersion] {
        static FROM_12: [&SupportedProtocolVersion; 2] =
            [&rustls::version::TLS13, &rustls::version::TLS12];
        static FROM_13: [&SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
        match self {
            MinVersion::Tls12 => &FROM_12,
            MinVersion::Tls13 => &FROM_13,
        }
    }
}

/// Everything a listener's TLS setup is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM: the certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM: the CAs a client certificate must chain to; `Some` makes client certificates
    /// required.
    pub client_ca: Option<PathBuf>,
    pub min_version: MinVersion,
    /// ALPN protocols offered, in preference order (`http/1.1` on HTTP listeners); empty: no
    /// ALPN. A client that offers ALPN without any of these is refused, as RFC 7301 asks.
    pub alpn: Vec<Vec<u8>>,
}

/// What a shard needs to start the TLS connections of one listener: the configuration their
/// handshakes use. Cheap to clone (an `Arc`); two are equal when they share the configuration.
#[derive(Clone)]
pub struct TlsAcceptor(Arc<ServerConfig>);

impl TlsAcceptor {
    pub fn new(config: Arc<ServerConfig>) -> TlsAcceptor {
        TlsAcceptor(config)
    }

    /// The server side of one new connection.
    pub fn accept(&self) -> TlsConn {
        TlsConn::new(self.0.clone())
    }
}

impl PartialEq for TlsAcceptor {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for TlsAcceptor {}

/// Nothing of the configuration (it holds the key).
impl std::fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsAcceptor")
    }
}

/// What a shard needs to open client TLS connections (the load generator): the client
/// configuration and the name the server's certificate must carry.
#[derive(Clone)]
pub struct TlsConnector {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl TlsConnector {
    pub fn new(config: Arc<ClientConfig>, name: ServerName<'static>) -> TlsConnector {
        TlsConnector { config, name }
    }

    /// A client trusting the CA certificates in the PEM file `ca`, expecting certificates for
    /// `name` (a DNS name or an IP address), offering `alpn`. `resume`: whether to resume
    /// sessions (off, every handshake is a full one).
    pub fn from_ca(
        ca: &Path,
        name: &str,
        alpn: &[&[u8]],
        resume: bool,
    ) -> Result<TlsConnector, LoadError> {
        let mut roots = RootCertStore::empty();
        for (i, cert) in certs(TlsFile::ClientCa, ca)?.into_iter().enumerate() {
            roots.add(cert).map_err(|e| {
                fail(
                    TlsFile::ClientCa,
                    ca,
                    format!("certificate {} is not a usable CA certificate: {e}", i + 1),
                )
            })?;
        }
        let server = ServerName::try_from(name.to_string()).map_err(|_| {
            fail(
                TlsFile::ClientCa,
                ca,
                format!("`{name}` is not a DNS name or an IP address"),
            )
        })?;
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports TLS 1.2 and 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        if !resume {
            config.resumption = rustls::client::Resumption::disabled();
        }
        Ok(TlsConnector::new(Arc::new(config), server))
    }

    pub fn config(&self) -> Arc<ClientConfig> {
        self.config.clone()
    }

    pub fn name(&self) -> &ServerName<'static> {
        &self.name
    }

    /// The client side of one new connection.
    pub fn connect(&self) -> Result<TlsClient, TlsError> {
        TlsClient::new(self.config.clone(), self.name.clone())
    }
}

impl PartialEq for TlsConnector {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.config, &other.config) && self.name == other.name
    }
}

impl Eq for TlsConnector {}

impl std::fmt::Debug for TlsConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConnector")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// One listener's TLS server side: the current rustls configuration and how to rebuild it.
///
/// A reload builds a new `Arc<ServerConfig>` and replaces the old one only if every file was
/// good: handshakes started from then on use it, connections already open keep the one they
/// started with (each holds its own `Arc`).
pub struct ServerTls {
    settings: TlsSettings,
    config: Arc<ServerConfig>,
}

/// Shows the settings only: nothing of the key, not even rustls's description of it.
impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    pub fn new(settings: TlsSettings) -> Result<ServerTls, LoadError> {
        let config = build(&settings, None)?;
        Ok(ServerTls { settings, config })
    }

    pub fn settings(&self) -> &TlsSettings {
        &self.settings
    }

    /// The configuration new handshakes use (shards keep a clone).
    pub fn config(&self) -> Arc<ServerConfig> {
        self.config.clone()
    }

    /// Re-reads the files, with `settings` (which may name other files). On success, new
    /// handshakes use the new certificate; on failure nothing changes and the error says why.
    pub fn reload(&mut self, settings: TlsSettings) -> Result<(), LoadError> {
        *self = self.reloaded(settings)?;
        Ok(())
    }

    /// What [`ServerTls::reload`] would switch to, without switching: a reload of several
    /// listeners checks every one before it applies any.
    pub fn reloaded(&self, settings: TlsSettings) -> Result<ServerTls, LoadError> {
        // The ticket keys carry over, so clients holding a ticket still resume.
        let ticketer = self.config.ticketer.clone();
        let config = build(&settings, Some(ticketer))?;
        Ok(ServerTls { settings, config })
    }

    /// The server side of one new connection, using the current configuration.
    pub fn accept(&self) -> TlsConn {
        TlsConn::new(self.config.clone())
    }

    /// The current configuration, for the shards.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::new(self.config.clone())
    }
}

fn read(file: TlsFile, path: &Path) -> Result<Vec<u8>, LoadError> {
    std::fs::read(path).map_err(|e| fail(file, path, format!("cannot read: {}", io_reason(&e))))
}

fn io_reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => "no such file".into(),
        io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

fn fail(file: TlsFile, path: &Path, reason: String) -> LoadError {
    LoadError {
        file,
        path: path.to_path_buf(),
        reason,
    }
}

/// Why a PEM file could not be parsed, in words that quote nothing from it.
fn pem_reason(e: &pem::Error, what: &str) -> String {
    match e {
        pem::Error::MissingSectionEnd { .. } => "not valid PEM: a section has no END line".into(),
        pem::Error::IllegalSectionStart { .. } => "not valid PEM: a malformed BEGIN line".into(),
        pem::Error::Base64Decode(_) => "not valid PEM: the base64 of a section is corrupt".into(),
        pem::Error::NoItemsFound => format!("no {what} found (expected a PEM file)"),
        pem::Error::SectionTooLarge => "not valid PEM: a section is too large".into(),
        _ => "not valid PEM".into(),
    }
}

fn certs(file: TlsFile, path: &Path) -> Result<Vec<CertificateDer<'static>>, LoadError> {
    let bytes = read(file, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(file, path, pem_reason(&e, "certificate")))?;
    if certs.is_empty() {
        return Err(fail(
            file,
            path,
            "no certificate found (expected PEM with a BEGIN CERTIFICATE section)".into(),
        ));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, LoadError> {
    let bytes = read(TlsFile::Key, path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => fail(
            TlsFile::Key,
            path,
            "no private key found (expected PEM with a BEGIN PRIVATE KEY, RSA PRIVATE KEY or \
             EC PRIVATE KEY section)"
                .into(),
        ),
        e => fail(TlsFile::Key, path, pem_reason(&e, "private key")),
    })
}

/// Builds the rustls configuration from the files `settings` names. `ticketer`: the session
/// ticket keys to keep (a reload), else new ones.
pub fn build(
    settings: &TlsSettings,
    ticketer: Option<Arc<dyn ProducesTickets>>,
) -> Result<Arc<ServerConfig>, LoadError> {
    let provider = provider();
    let chain = certs(TlsFile::Cert, &settings.cert)?;
    let key = private_key(&settings.key)?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(settings.min_version.versions())
        .expect("ring supports TLS 1.2 and 1.3");
    let builder = match &settings.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for (i, ca) in certs(TlsFile::ClientCa, path)?.into_iter().enumerate() {
                roots.add(ca).map_err(|e| {
                    fail(
                        TlsFile::ClientCa,
                        path,
                        format!("certificate {} is not a usable CA certificate: {e}", i + 1),
                    )
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| fail(TlsFile::ClientCa, path, format!("unusable CA list: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        // rustls's errors here are about the key (unsupported algorithm, not matching the
        // certificate's public key) or the leaf certificate it is compared with; they name no
        // key material.
        if let rustls::Error::InvalidCertificate(e) = e {
            return fail(
                TlsFile::Cert,
                &settings.cert,
                format!("the first certificate is not a valid X.509 certificate ({e:?})"),
            );
        }
        let reason = match e {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => format!(
                "does not match the certificate in {}",
                settings.cert.display()
            ),
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown) => format!(
                "cannot be checked against the certificate in {} (unsupported key type?)",
                settings.cert.display()
            ),
            rustls::Error::General(m) => format!("unusable private key: {m}"),
            e => format!("unusable private key: {e}"),
        };
        fail(TlsFile::Key, &settings.key, reason)
    })?;
    config.alpn_protocols = settings.alpn.clone();
    // Stateless session tickets: no per-session memory on the server and no lock shared by the
    // shards (a stateful cache is one mutex for all of them); any shard can resume any ticket.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.ticketer = match ticketer {
        Some(t) => t,
        None => rustls::crypto::ring::Ticketer::new().map_err(|e| {
            fail(
                TlsFile::Key,
                &settings.key,
                format!("cannot make session ticket keys: {e}"),
            )
        })?,
    };
    Ok(Arc::new(config))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::tls::testpki::Pki;

    /// A listener's settings from the test PKI: its server certificate, nothing else.
    pub(crate) fn settings(pki: &Pki) -> TlsSettings {
        TlsSettings {
            cert: pki.cert.clone(),
            key: pki.key.clone(),
            client_ca: None,
            min_version: MinVersion::Tls12,
            alpn: Vec::new(),
        }
    }

    fn err(s: TlsSettings) -> LoadError {
        match ServerTls::new(s) {
            Ok(_) => panic!("loaded"),
            Err(e) => e,
        }
    }

    #[test]
    fn good_files_load_with_and_without_client_ca() {
        let pki = Pki::new();
        ServerTls::new(settings(&pki)).unwrap();
        let mut s = settings(&pki);
        s.client_ca = Some(pki.ca.clone());
        s.min_version = MinVersion::Tls13;
        s.alpn = vec![b"http/1.1".to_vec()];
        let tls = ServerTls::new(s).unwrap();
        assert_eq!(tls.config().alpn_protocols, vec![b"http/1.1".to_vec()]);
    }

    #[test]
    fn missing_unreadable_and_non_pem_files_are_named() {
        let pki = Pki::new();
        let mut s = settings(&pki);
        s.cert = pki.dir.join("nope.pem");
        let e = err(s);
        assert_eq!(e.file, TlsFile::Cert);
        assert_eq!(
            e.to_string(),
            format!(
                "{}: cannot read: no such file",
                pki.dir.join("nope.pem").display()
            )
        );

        let mut s = settings(&pki);
        s.key = pki.dir.clone();
        let e = err(s);
        assert_eq!(e.file, TlsFile::Key);
        assert!(e.reason.starts_with("cannot read: "), "{e}");

        let mut s = settings(&pki);
        s.cert = pki.file("text.pem", "this is not a certificate\n");
        let e = err(s);
        assert_eq!(e.file, TlsFile::Cert);
        assert!(e.reason.contains("no certificate found"), "{e}");

        let mut s = settings(&pki);
        s.client_ca = Some(pki.dir.join("absent-ca.pem"));
        assert_eq!(err(s).file, TlsFile::ClientCa);

        // A certificate whose base64 is valid but whose DER is not a certificate.
        let mut s = settings(&pki);
        s.cert = pki.file(
            "junk.pem",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        );
        let e = err(s);
        assert_eq!(e.file, TlsFile::Cert, "{e}");
    }

    #[test]
    fn a_key_that_does_not_match_the_certificate_is_refused() {
        let pki = Pki::new();
        let mut s = settings(&pki);
        s.key = pki.client_key.clone();
        let e = err(s);
        assert_eq!(e.file, TlsFile::Key);
        assert!(e.reason.contains("does not match the certificate"), "{e}");
        // A certificate where the key should be.
        let mut s = settings(&pki);
        s.key = pki.cert.clone();
        let e = err(s);
        assert!(e.reason.contains("no private key found"), "{e}");
    }

    #[test]
    fn a_broken_key_file_is_refused_without_quoting_it() {
        let pki = Pki::new();
        let key = std::fs::read_to_string(&pki.key).unwrap();
        let body: Vec<&str> = key.lines().filter(|l| !l.starts_with("-----")).collect();
        // Corrupt base64 in the middle, a missing END line, a malformed BEGIN line.
        let corrupt = key.replacen(&body[0][4..12], "!!!!@@@@", 1);
        let truncated: String = key.lines().take(2).map(|l| format!("{l}\n")).collect();
        let bad_begin = format!("-----BEGIN PRIVATE KEY\n{}", body.join("\n"));
        for (name, text) in [
            ("corrupt", corrupt),
            ("truncated", truncated),
            ("begin", bad_begin),
        ] {
            let mut s = settings(&pki);
            s.key = pki.file(&format!("{name}.pem"), &text);
            let e = err(s);
            assert_eq!(e.file, TlsFile::Key, "{name}: {e}");
            let shown = e.to_string();
            for line in &body {
                for piece in line.as_bytes().chunks(8).filter(|p| p.len() == 8) {
                    let piece = std::str::from_utf8(piece).unwrap();
                    assert!(
                        !shown.contains(piece),
                        "{name}: the message quotes the key: {shown}"
                    );
                }
            }
        }
    }

    #[test]
    fn reload_swaps_only_a_good_configuration() {
        let pki = Pki::new();
        let mut tls = ServerTls::new(settings(&pki)).unwrap();
        let before = tls.config();
        let mut bad = settings(&pki);
        bad.cert = pki.file("empty.pem", "");
        assert_eq!(tls.reload(bad).unwrap_err().file, TlsFile::Cert);
        assert!(
            Arc::ptr_eq(&before, &tls.config()),
            "a bad file changes nothing"
        );
        assert_eq!(tls.settings(), &settings(&pki));

        let other = Pki::named("renewed");
        let mut renewed = settings(&other);
        renewed.alpn = vec![b"http/1.1".to_vec()];
        tls.reload(renewed.clone()).unwrap();
        assert!(!Arc::ptr_eq(&before, &tls.config()));
        assert_eq!(tls.settings(), &renewed);
        assert!(
            Arc::ptr_eq(&before.ticketer, &tls.config().ticketer),
            "ticket keys carry over"
        );
    }
}
