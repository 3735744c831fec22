//! A secured front for the stack's schema registry, owned by one test: HTTPS on
//! 127.0.0.1:0 with the test's own certificate (`TestCerts`), HTTP basic authentication
//! required, every authorised request passed on to the registry as it came (method, path,
//! query, body, content type). Apicurio 2.4 cannot ask for basic authentication without a
//! Keycloak, so the test puts this in front of it instead. Runs on a runtime of its own, so
//! that a test blocking its own threads (reading Kafka synchronously) never stalls it.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Largest request body passed on (a schema is a few KiB).
const MAX_BODY: usize = 1 << 20;

pub struct RegistryProxy {
    addr: SocketAddr,
    path: String,
    front: Arc<Front>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

struct Front {
    /// The one `Authorization` value let through.
    expected: String,
    /// Scheme, host and port of the registry behind.
    origin: String,
    http: reqwest::Client,
    passed: AtomicUsize,
    refused: AtomicUsize,
}

impl RegistryProxy {
    /// Serves `upstream` (a registry URL such as `http://127.0.0.1:8081/apis/ccompat/v7`)
    /// over TLS with `cert`/`key`, to `user` with `password` only.
    pub fn start(
        cert: &Path,
        key: &Path,
        user: &str,
        password: &str,
        upstream: &str,
    ) -> RegistryProxy {
        let certs = CertificateDer::pem_file_iter(cert)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .unwrap_or_else(|e| panic!("{}: {e}", cert.display()));
        let key =
            PrivateKeyDer::from_pem_file(key).unwrap_or_else(|e| panic!("{}: {e}", key.display()));
        let tls = rustls::ServerConfig::builder_with_provider(presence_core::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("the test's server certificate");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let upstream = url::Url::parse(upstream).expect("the registry's URL");
        let origin = upstream.origin().ascii_serialization();
        let front = Arc::new(Front {
            expected: format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            ),
            origin,
            http: reqwest::Client::new(),
            passed: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let addr = listener.local_addr().expect("bound address");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let app = axum::Router::new()
            .fallback(forward)
            .with_state(front.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("the proxy's runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                let serve = async {
                    loop {
                        let Ok((tcp, _)) = listener.accept().await else {
                            continue;
                        };
                        let (acceptor, app) = (acceptor.clone(), app.clone());
                        tokio::spawn(async move {
                            // A client that does not trust the certificate ends here.
                            let Ok(tls) = acceptor.accept(tcp).await else {
                                return;
                            };
                            let service = hyper_util::service::TowerToHyperService::new(app);
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                                .await;
                        });
                    }
                };
                tokio::select! {
                    _ = serve => {}
                    _ = stopped => {}
                }
            });
        });
        RegistryProxy {
            addr,
            path: upstream.path().trim_end_matches('/').to_string(),
            front,
            stop: Some(stop),
        }
    }

    /// The registry's URL through this front (`https://127.0.0.1:<port>/<upstream path>`).
    pub fn url(&self) -> String {
        format!("https://{}{}", self.addr, self.path)
    }

    /// Requests let through so far.
    pub fn passed(&self) -> usize {
        self.front.passed.load(Ordering::SeqCst)
    }

    /// Requests refused for their credentials so far.
    pub fn refused(&self) -> usize {
        self.front.refused.load(Ordering::SeqCst)
    }
}

impl Drop for RegistryProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn forward(State(front): State<Arc<Front>>, request: Request) -> Response {
    let authorised = request
        .headers()
        .get(header::AUTHORIZATION)
        .is_some_and(|v| v.as_bytes() == front.expected.as_bytes());
    if !authorised {
        front.refused.fetch_add(1, Ordering::SeqCst);
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Basic realm=\"schema registry\"")],
            r#"{"error_code":401,"message":"Unauthorized"}"#,
        )
            .into_response();
    }
    front.passed.fetch_add(1, Ordering::SeqCst);
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, MAX_BODY).await else {
        return StatusCode::PAYLOAD_TOO_LARGE.into_response();
    };
    let target = format!(
        "{}{}",
        front.origin,
        parts.uri.path_and_query().map_or("/", |p| p.as_str())
    );
    let mut out = front.http.request(parts.method, target).body(body);
    for name in [header::CONTENT_TYPE, header::ACCEPT] {
        if let Some(v) = parts.headers.get(&name) {
            out = out.header(name, v);
        }
    }
    match out.send().await {
        Ok(answer) => {
            let status = answer.status();
            let content_type = answer.headers().get(header::CONTENT_TYPE).cloned();
            let bytes = answer.bytes().await.unwrap_or_default();
            let mut response = (status, bytes).into_response();
            if let Some(ct) = content_type {
                response.headers_mut().insert(header::CONTENT_TYPE, ct);
            }
            response
        }
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}
