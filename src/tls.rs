//! TLS pieces shared by every client amibus opens with rustls (AMI sessions, the NATS sink's
//! connection): reading a CA file into a root store, with the same errors everywhere.

use std::path::Path;

use tokio_rustls::rustls::RootCertStore;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::pki_types::pem::PemObject;

/// Add every certificate of the PEM file at `path` to `roots`.
///
/// # Errors
/// The file cannot be read, holds bad PEM or a certificate rustls refuses, or holds none.
pub fn add_ca_file(roots: &mut RootCertStore, path: &Path) -> Result<(), String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut any = false;
    for cert in certs {
        let cert = cert.map_err(|e| format!("bad PEM in {}: {e}", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("bad CA certificate in {}: {e}", path.display()))?;
        any = true;
    }
    if !any {
        return Err(format!("no certificate in {}", path.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_adds_its_certificates_and_an_empty_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(&ca, cert.cert.pem()).unwrap();
        let mut roots = RootCertStore::empty();
        add_ca_file(&mut roots, &ca).unwrap();
        assert_eq!(roots.len(), 1);

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let e = add_ca_file(&mut roots, &empty).unwrap_err();
        assert!(e.starts_with("no certificate in"), "{e}");
        let e = add_ca_file(&mut roots, &dir.path().join("missing.pem")).unwrap_err();
        assert!(e.starts_with("cannot read"), "{e}");
    }
}
