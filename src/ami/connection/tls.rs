//! TLS for AMI sessions: rustls with the `ring` provider.

use super::*;

pub(super) type Connector = (
    tokio_rustls::TlsConnector,
    tokio_rustls::rustls::pki_types::ServerName<'static>,
);

/// A TLS connector for `tls` using the `ring` provider.
pub(super) fn tls_connector(tls: &TlsConfig) -> Result<Connector, String> {
    use tokio_rustls::rustls::pki_types::ServerName;
    use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?;
    let config = if tls.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(insecure::NoVerify(provider)))
            .with_no_client_auth()
    } else {
        let path = tls
            .ca_file
            .as_ref()
            .ok_or_else(|| "tls.ca_file is required".to_owned())?;
        let mut roots = RootCertStore::empty();
        crate::tls::add_ca_file(&mut roots, path)?;
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    let name = ServerName::try_from(tls.server_name.clone())
        .map_err(|e| format!("bad TLS server name {:?}: {e}", tls.server_name))?;
    Ok((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
}

pub(super) mod insecure {
    //! `insecure_skip_verify`: accept any certificate, but still check the handshake
    //! signatures so the session keys belong to whoever holds that certificate.

    use std::sync::Arc;

    use tokio_rustls::rustls::client::danger::{
        HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
    };
    use tokio_rustls::rustls::crypto::{
        CryptoProvider, verify_tls12_signature, verify_tls13_signature,
    };
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use tokio_rustls::rustls::{DigitallySignedStruct, Error, SignatureScheme};

    #[derive(Debug)]
    pub struct NoVerify(pub Arc<CryptoProvider>);

    impl ServerCertVerifier for NoVerify {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp_response: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
}
