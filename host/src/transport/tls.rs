//! Cluster certificates and the rustls configurations built from them.
//!
//! A cluster CA (made by `replicator cluster init` with rcgen) signs one
//! certificate per node, whose DNS SAN is `node-<id>`, and one client
//! certificate whose SAN is `client`. Both sides of every connection must
//! present a certificate signed by the CA (mutual TLS, TLS 1.3 only,
//! 0-RTT off). Who a peer *is* comes from its certificate: a node claiming
//! id 3 must present a certificate valid for `node-3` ([`verify_identity`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::core::ReplicaId;

/// ALPN protocol id: names the wire version, so a node speaking another
/// version fails the handshake instead of misreading frames.
pub const ALPN: &[u8] = b"replicator/2";
// Bumping the wire version without the ALPN (or the reverse) fails the
// build.
const _: () = assert!(ALPN[ALPN.len() - 1] == b'0' + crate::wire::VERSION);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {error}")]
    Read {
        what: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{what} {path} holds no usable PEM {expected}: {detail}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
        detail: String,
    },
    #[error("TLS configuration: {0}")]
    Config(String),
    /// This party's own certificate, which peers would refuse (or which
    /// cannot be read for its validity).
    #[error("certificate {path}: {why}")]
    Own { path: PathBuf, why: String },
    #[error("certificate generation: {0}")]
    Generate(String),
}

/// Who a certificate (or a peer) is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Identity {
    Node(ReplicaId),
    Client,
}

impl Identity {
    /// The DNS name in this identity's certificate.
    pub fn dns_name(&self) -> String {
        match self {
            Identity::Node(id) => format!("node-{id}"),
            Identity::Client => "client".to_string(),
        }
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.dns_name())
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// PEM files of a CA and of certificates it issued.
pub struct GeneratedCa {
    pub cert_pem: String,
    pub key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl GeneratedCa {
    /// A fresh cluster CA (ECDSA P-256, rcgen's default validity).
    pub fn new(cluster: &str) -> Result<Self, TlsError> {
        let gen_err = |e: rcgen::Error| TlsError::Generate(e.to_string());
        let key = KeyPair::generate().map_err(gen_err)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("replicator CA {cluster}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).map_err(gen_err)?;
        let key_pem = key.serialize_pem();
        Ok(GeneratedCa {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA `cluster init` made, from its certificate and the key it
    /// kept (`--ca-key-out`), to issue more certificates. Refuses a key
    /// that is not the certificate's: what it signed would chain to no
    /// CA the nodes know.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        if !key_pem.contains("PRIVATE KEY-----") && key_pem.contains("CERTIFICATE-----") {
            return Err(TlsError::Generate(
                "the CA key file holds a certificate, not a private key: give the key `cluster init --ca-key-out` kept".into(),
            ));
        }
        let key = KeyPair::from_pem(key_pem).map_err(|e| {
            TlsError::Generate(format!(
                "the CA key is not a usable key ({e}): a PKCS#8 PEM key is wanted (`-----BEGIN PRIVATE KEY-----`, as `cluster init --ca-key-out` writes it; `openssl pkcs8 -topk8 -nocrypt -in KEY` converts others)"
            ))
        })?;
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        // The key's certificate among those the file holds: during a move
        // to a new CA it holds the old one and the new one.
        let mut found = None;
        let mut seen = 0;
        for der in CertificateDer::pem_slice_iter(cert_pem.as_bytes()) {
            seen += 1;
            let der = der.map_err(|e| TlsError::Generate(format!("the CA certificate: {e}")))?;
            let (_, cert) = x509_parser::parse_x509_certificate(&der)
                .map_err(|e| TlsError::Generate(format!("the CA certificate: {e}")))?;
            if cert.public_key().raw == spki.as_slice() {
                found = Some(der.clone());
                break;
            }
        }
        if seen == 0 {
            return Err(TlsError::Generate(
                "the CA file holds no certificate".into(),
            ));
        }
        let Some(der) = found else {
            return Err(TlsError::Generate(format!(
                "the CA key belongs to none of the {seen} CA certificate(s) in the file: use the key of this cluster's CA (`cluster init --ca-key-out` kept it), or list that CA's certificate in the `ca` file too"
            )));
        };
        let issuer = Issuer::from_ca_cert_der(&der, key)
            .map_err(|e| TlsError::Generate(format!("the CA certificate: {e}")))?;
        Ok(GeneratedCa {
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
            issuer,
        })
    }

    /// A certificate and key for `identity`, signed by this CA; usable as
    /// both a TLS server and client certificate.
    pub fn issue(&self, identity: Identity) -> Result<(String, String), TlsError> {
        self.issue_until(identity, None)
    }

    /// [`GeneratedCa::issue`], valid until `not_after` (from an hour ago,
    /// for clocks a little behind), or rcgen's default (until 4096).
    pub fn issue_until(
        &self,
        identity: Identity,
        not_after: Option<SystemTime>,
    ) -> Result<(String, String), TlsError> {
        let gen_err = |e: rcgen::Error| TlsError::Generate(e.to_string());
        let key = KeyPair::generate().map_err(gen_err)?;
        let mut params = CertificateParams::new(vec![identity.dns_name()]).map_err(gen_err)?;
        if let Some(t) = not_after {
            params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
            params.not_after = time::OffsetDateTime::from(t);
        }
        params
            .distinguished_name
            .push(DnType::CommonName, identity.dns_name());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).map_err(gen_err)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// Where a node's or client's TLS material lives.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsPaths {
    /// The cluster CA certificate (PEM).
    pub ca: PathBuf,
    /// This party's certificate chain (PEM).
    pub cert: PathBuf,
    /// This party's private key (PEM).
    pub key: PathBuf,
}

impl TlsPaths {
    /// Resolve relative paths against `base` (the config file's directory).
    pub fn resolved(&self, base: &Path) -> TlsPaths {
        TlsPaths {
            ca: base.join(&self.ca),
            cert: base.join(&self.cert),
            key: base.join(&self.key),
        }
    }
}

/// Loaded TLS material: builds server and client configurations.
#[derive(Clone)]
pub struct TlsMaterial {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    /// Where `chain` came from, for messages about it.
    cert_path: PathBuf,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        what,
        path: path.to_path_buf(),
        error,
    })
}

fn certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(what, path)?;
    let pem_err = |detail: String| TlsError::Pem {
        what,
        path: path.to_path_buf(),
        expected: "CERTIFICATE",
        detail,
    };
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_err("no certificate found".into()));
    }
    Ok(certs)
}

/// The permission bits of `path` if its group or others may read or write
/// it, else `None` (also when they cannot be read: the read that follows
/// reports that).
fn exposed_mode(path: &Path) -> Option<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
        (mode & 0o066 != 0).then_some(mode)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

impl TlsMaterial {
    pub fn load(paths: &TlsPaths) -> Result<Self, TlsError> {
        let ca = certs("CA certificate", &paths.ca)?;
        let mut roots = RootCertStore::empty();
        for c in ca {
            roots.add(c).map_err(|e| TlsError::Pem {
                what: "CA certificate",
                path: paths.ca.clone(),
                expected: "CA CERTIFICATE",
                detail: e.to_string(),
            })?;
        }
        let chain = certs("certificate", &paths.cert)?;
        let key_bytes = read("private key", &paths.key)?;
        if let Some(mode) = exposed_mode(&paths.key) {
            // A warning, not a refusal (ssh refuses): a key mounted from a
            // secret store is often 0644 inside a container that is the
            // only reader.
            tracing::warn!(
                "the private key {key} is open to other users (mode {mode:o}): whoever reads it can present {} as their own; `chmod 600 {key}`",
                paths.cert.display(),
                key = paths.key.display(),
            );
        }
        let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| TlsError::Pem {
            what: "private key",
            path: paths.key.clone(),
            expected: "PRIVATE KEY",
            detail: e.to_string(),
        })?;
        Ok(TlsMaterial {
            roots: Arc::new(roots),
            chain,
            key: Arc::new(key),
            cert_path: paths.cert.clone(),
        })
    }

    /// The file this party's certificate came from.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// `why` this party's own certificate is refused, naming its file.
    pub fn own_error(&self, why: String) -> TlsError {
        TlsError::Own {
            path: self.cert_path.clone(),
            why,
        }
    }

    /// When peers start refusing this party's certificate: the earliest
    /// `notAfter` in its chain (the certificate and any intermediates
    /// after it). The CA's own is not counted: rustls (webpki) takes a
    /// trust anchor as a name and a key, and does not check its validity.
    pub fn not_after(&self) -> Result<SystemTime, TlsError> {
        let own = |why| self.own_error(why);
        let mut earliest: Option<i64> = None;
        for der in &self.chain {
            let (_, cert) = x509_parser::parse_x509_certificate(der)
                .map_err(|e| own(format!("cannot read its validity period: {e}")))?;
            let t = cert.validity().not_after.timestamp();
            earliest = Some(earliest.map_or(t, |e| e.min(t)));
        }
        let secs = earliest.ok_or_else(|| own("empty certificate chain".into()))?;
        // Before 1970: long expired, as the start's own check says.
        Ok(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0)))
    }

    /// The identity this party's own certificate is valid for, if either
    /// `expected`. Used at startup so a node refuses a certificate that is
    /// not its own, instead of failing every handshake later.
    pub fn check_own_identity(&self, expected: Identity) -> Result<(), TlsError> {
        // Each refusal names the file: "this certificate is outside its
        // validity period" did not say which of a node's files it meant.
        let own = |why| self.own_error(why);
        let leaf = self
            .chain
            .first()
            .ok_or_else(|| own("empty certificate chain".into()))?;
        verify_identity(leaf, expected).map_err(|e| {
            own(format!(
                "it is not valid for {expected} ({e}); use the one `cluster init` wrote for it, or issue one with `replicator cluster cert {}`",
                match expected {
                    Identity::Node(id) => format!("--node {id}"),
                    Identity::Client => "--client".to_string(),
                }
            ))
        })?;
        // Peers check it against the same CA: one that does not chain to
        // it would fail every handshake, with nothing but silence to show
        // (a node took its `ca` from another file, and only heard "cannot
        // reach a majority").
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        verifier
            .verify_client_cert(leaf, &self.chain[1..], rustls_pki_types::UnixTime::now())
            .map(|_| ())
            .map_err(|e| own(refused_by_peers(&e)))?;
        // A node serves too: peers dialling it check its certificate as a
        // server's. One issued for client authentication only passed the
        // check above, and the node started to hear only "cannot reach a
        // majority" while every peer refused its handshakes.
        if let Identity::Node(_) = expected {
            let name = ServerName::try_from(expected.dns_name())
                .map_err(|e| TlsError::Config(e.to_string()))?;
            WebPkiServerVerifier::builder_with_provider(self.roots.clone(), provider())
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?
                .verify_server_cert(
                    leaf,
                    &self.chain[1..],
                    &name,
                    &[],
                    rustls_pki_types::UnixTime::now(),
                )
                .map_err(|e| {
                    own(format!(
                        "peers would refuse it when they dial {expected} ({e}): a node's certificate needs the serverAuth extended key usage as well as clientAuth, as those `replicator cluster init` issues have"
                    ))
                })?;
        }
        // The key must be the certificate's: with another one every
        // handshake fails its signature check at the peer.
        CertifiedKey::from_der(self.chain.clone(), self.key.clone_key(), &provider()).map_err(
            |e| {
                own(format!(
                    "the private key does not belong to this certificate ({e}); point `key` at the key written with it (by `cluster init` or `cluster cert`)"
                ))
            },
        )?;
        Ok(())
    }

    /// Server side: TLS 1.3, client certificate required and checked
    /// against the CA, ALPN, no 0-RTT.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let cfg_err = |e: rustls::Error| TlsError::Config(e.to_string());
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(cfg_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(cfg_err)?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        // 0-RTT data is replayable: never accept it.
        cfg.max_early_data_size = 0;
        Ok(cfg)
    }

    /// Client side: TLS 1.3, the server must chain to the CA and be valid
    /// for the name we dial (`node-<id>`), our certificate presented.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let cfg_err = |e: rustls::Error| TlsError::Config(e.to_string());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(cfg_err)?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(cfg_err)?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        cfg.enable_early_data = false;
        Ok(cfg)
    }
}

/// What to tell an operator whose own certificate peers would refuse
/// (as a client's) for `e`. "Does not chain to the CA" was said of every
/// refusal, an expired certificate's too, and sent operators to the wrong
/// file.
fn refused_by_peers(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(
            C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. },
        ) => format!(
            "it is outside its validity period ({e}), so every peer would refuse it; issue a new one (`replicator cluster cert`), and check this machine's clock too"
        ),
        rustls::Error::InvalidCertificate(C::InvalidPurpose | C::InvalidPurposeContext { .. }) => {
            format!(
                "it does not allow client authentication ({e}), so every peer would refuse it; it needs the clientAuth extended key usage (and serverAuth for a node), as those `replicator cluster init` issues have"
            )
        }
        _ => format!(
            "it does not chain to the CA certificate the config names ({e}), so every peer would refuse it; point `ca` at the cluster's ca.pem and the certificate at one its CA issued (while the cluster moves to a new CA, the `ca` file lists both)"
        ),
    }
}

/// A warning if the private key at `path` is open to other users (the CA
/// key: whoever reads it can issue a certificate for any node).
pub fn exposed_key_warning(path: &Path) -> Option<String> {
    exposed_mode(path).map(|mode| {
        format!(
            "the CA key {key} is open to other users (mode {mode:o}): whoever reads it can issue a certificate for any node; `chmod 600 {key}`",
            key = path.display()
        )
    })
}

/// A duration as an operator reads it, rounded to the nearest unit and
/// the unit chosen after rounding: seconds below 2 min, minutes below
/// 2 h, hours below 2 days, else days. (Floored, the hour mark, reached a
/// moment late, read "59 min".)
pub fn duration_text(d: Duration) -> String {
    let s = d.as_secs();
    let near = |unit: u64| (s + unit / 2) / unit;
    if s < 120 {
        format!("{s} s")
    } else if near(60) < 120 {
        format!("{} min", near(60))
    } else if near(3_600) < 48 {
        format!("{} h", near(3_600))
    } else {
        format!("{} days", near(86_400))
    }
}

/// `t` as an RFC 3339 UTC time, for messages.
pub fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("{t:?}"))
}

/// Is `cert` (already verified against the CA by the handshake) valid for
/// `identity`'s name?
pub fn verify_identity(cert: &CertificateDer<'_>, identity: Identity) -> Result<(), String> {
    let ee = webpki::EndEntityCert::try_from(cert).map_err(|e| e.to_string())?;
    let name = ServerName::try_from(identity.dns_name()).map_err(|e| e.to_string())?;
    ee.verify_is_valid_for_subject_name(&name)
        .map_err(|e| format!("certificate is not valid for {identity}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Group or others may read or write the key: a warning names the
    /// mode; the owner alone (what `cluster init` writes) is quiet.
    #[cfg(unix)]
    #[test]
    fn a_key_others_can_read_is_reported() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("key.pem");
        std::fs::write(&key, "k").expect("write");
        for (mode, exposed) in [
            (0o600, None),
            (0o400, None),
            (0o640, Some(0o640)),
            (0o602, Some(0o602)),
        ] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).expect("chmod");
            assert_eq!(exposed_mode(&key), exposed, "{mode:o}");
        }
    }

    /// A certificate's parameters for `identity` with `ekus` only.
    fn params(identity: Identity, ekus: Vec<ExtendedKeyUsagePurpose>) -> CertificateParams {
        let mut params = CertificateParams::new(vec![identity.dns_name()]).expect("params");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = ekus;
        params
    }

    /// `params` signed by `ca`, and a fresh key.
    fn signed(
        ca: &GeneratedCa,
        params: CertificateParams,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &ca.issuer).expect("signed");
        let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).expect("key pem");
        (vec![cert.der().clone()], key)
    }

    /// `ca`'s certificate for `identity` with `ekus` only, and its key.
    fn issued_with(
        ca: &GeneratedCa,
        identity: Identity,
        ekus: Vec<ExtendedKeyUsagePurpose>,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        signed(ca, params(identity, ekus))
    }

    fn material(
        ca: &GeneratedCa,
        (chain, key): (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
    ) -> TlsMaterial {
        let mut roots = RootCertStore::empty();
        let ca_der = CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).expect("ca pem");
        roots.add(ca_der).expect("root");
        TlsMaterial {
            roots: Arc::new(roots),
            chain,
            key: Arc::new(key),
            cert_path: PathBuf::from("node.pem"),
        }
    }

    #[test]
    fn a_node_certificate_must_serve_as_well_as_authenticate_a_client() {
        use ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
        let ca = GeneratedCa::new("test").expect("ca");
        let node = Identity::Node(1);
        let both = material(&ca, issued_with(&ca, node, vec![ServerAuth, ClientAuth]));
        both.check_own_identity(node)
            .expect("a node's usual certificate");

        let client_only = material(&ca, issued_with(&ca, node, vec![ClientAuth]));
        let e = client_only.check_own_identity(node).expect_err("refused");
        assert!(
            e.to_string()
                .contains("needs the serverAuth extended key usage"),
            "{e}"
        );
        // A client never serves: clientAuth alone is its whole job.
        let client = material(&ca, issued_with(&ca, Identity::Client, vec![ClientAuth]));
        client
            .check_own_identity(Identity::Client)
            .expect("a client's certificate");
        // A server-only certificate fails the client check, and says so.
        let server_only = material(&ca, issued_with(&ca, node, vec![ServerAuth]));
        let e = server_only.check_own_identity(node).expect_err("refused");
        assert!(
            e.to_string()
                .contains("does not allow client authentication"),
            "{e}"
        );
    }

    #[test]
    fn an_expired_certificate_is_called_expired_not_foreign() {
        use ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
        let ca = GeneratedCa::new("test").expect("ca");
        let node = Identity::Node(3);
        let mut expired = params(node, vec![ServerAuth, ClientAuth]);
        expired.not_before = rcgen::date_time_ymd(2020, 1, 1);
        expired.not_after = rcgen::date_time_ymd(2021, 1, 1);
        let e = material(&ca, signed(&ca, expired))
            .check_own_identity(node)
            .expect_err("refused");
        let e = e.to_string();
        assert!(
            e.contains("outside its validity period") && !e.contains("does not chain"),
            "{e}"
        );
    }

    /// A CA loaded from the files `cluster init` kept issues certificates
    /// its nodes accept, with the validity asked for; another CA's key is
    /// refused.
    #[test]
    fn a_kept_ca_issues_certificates_until_the_time_asked() {
        let made = GeneratedCa::new("test").expect("ca");
        let ca = GeneratedCa::from_pem(&made.cert_pem, &made.key_pem).expect("loaded");
        let until = SystemTime::now() + Duration::from_secs(5 * 86_400);
        let (cert, key) = ca
            .issue_until(Identity::Node(2), Some(until))
            .expect("issued");
        let chain = vec![CertificateDer::from_pem_slice(cert.as_bytes()).expect("pem")];
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key pem");
        let m = material(&made, (chain, key));
        m.check_own_identity(Identity::Node(2)).expect("accepted");
        let got = m.not_after().expect("not after");
        let off = got.duration_since(until).unwrap_or_else(|e| e.duration());
        assert!(off < Duration::from_secs(2), "{off:?}");
        let other = GeneratedCa::new("other").expect("ca");
        let e = GeneratedCa::from_pem(&made.cert_pem, &other.key_pem)
            .err()
            .expect("refused");
        assert!(e.to_string().contains("belongs to none of the 1"), "{e}");
        // A bundle (a move to a new CA) holds the key's CA second.
        let bundle = format!("{}{}", other.cert_pem, made.cert_pem);
        let ca = GeneratedCa::from_pem(&bundle, &made.key_pem).expect("found in the bundle");
        let (cert, key) = ca.issue(Identity::Node(2)).expect("issued");
        let chain = vec![CertificateDer::from_pem_slice(cert.as_bytes()).expect("pem")];
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key pem");
        material(&made, (chain, key))
            .check_own_identity(Identity::Node(2))
            .expect("chains to the key's CA");
    }

    #[test]
    fn a_key_that_is_not_the_certificate_s_is_refused_at_startup() {
        let ca = GeneratedCa::new("test").expect("ca");
        let node = Identity::Node(2);
        let usual = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let (chain, _) = issued_with(&ca, node, usual.clone());
        let (_, other_key) = issued_with(&ca, node, usual);
        let e = material(&ca, (chain, other_key))
            .check_own_identity(node)
            .expect_err("refused");
        assert!(
            e.to_string()
                .contains("the private key does not belong to this certificate"),
            "{e}"
        );
    }
}
