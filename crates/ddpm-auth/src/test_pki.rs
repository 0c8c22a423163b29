//! Certificates for tests (feature `test-pki`): a CA, a server certificate for `localhost`
//! and 127.0.0.1 signed by it, a client certificate signed by it, and a second CA that signs
//! nothing here (a client trusting only that one must refuse the server).

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

/// PEM files written by [`TestPki::write`].
#[derive(Debug, Clone)]
pub struct TestPki {
    /// The CA that signed both certificates.
    pub ca: PathBuf,
    /// Another CA, which signed neither.
    pub other_ca: PathBuf,
    /// Server certificate (SANs `localhost`, `127.0.0.1`).
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
    /// Client certificate (CN `ddpm-test-client`).
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
}

fn ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::new()).expect("no names");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("self-signed CA");
    (cert.pem(), Issuer::new(params, key))
}

fn leaf(
    names: &[&str],
    cn: &str,
    usage: ExtendedKeyUsagePurpose,
    issuer: &Issuer<'static, KeyPair>,
) -> (String, String) {
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("valid names");
    params.distinguished_name.push(DnType::CommonName, cn);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, issuer).expect("signed");
    (cert.pem(), key.serialize_pem())
}

impl TestPki {
    /// Generates the certificates and writes them into `dir`.
    pub fn write(dir: &Path) -> std::io::Result<Self> {
        let (ca_pem, issuer) = ca("ddpm test CA");
        let (other_pem, _) = ca("ddpm other CA");
        let (server_cert, server_key) = leaf(
            &["localhost", "127.0.0.1"],
            "localhost",
            ExtendedKeyUsagePurpose::ServerAuth,
            &issuer,
        );
        let (client_cert, client_key) = leaf(
            &["ddpm-test-client"],
            "ddpm-test-client",
            ExtendedKeyUsagePurpose::ClientAuth,
            &issuer,
        );
        let pki = Self {
            ca: dir.join("ca.pem"),
            other_ca: dir.join("other-ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        };
        for (path, text) in [
            (&pki.ca, ca_pem),
            (&pki.other_ca, other_pem),
            (&pki.server_cert, server_cert),
            (&pki.server_key, server_key),
            (&pki.client_cert, client_cert),
            (&pki.client_key, client_key),
        ] {
            std::fs::write(path, text)?;
        }
        Ok(pki)
    }
}
