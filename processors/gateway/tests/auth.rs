//! The gateway's authentication, tried as an attacker would (issue #10, items 3 and 4):
//! tokens signed with keys the test generates (RSA, EC P-256, Ed25519) and published in a
//! JWKS file or served over https by a private CA the test makes; key rotation; every JWT
//! edge (wrong aud/iss, unknown kid, alg none, HS/RS confusion, expired, not yet valid,
//! too long-lived); stream tickets (region scope, expiry, the stream closing with its grant)
//! and tokens in URLs. The gateway runs for real against the stack's Redis and Kafka.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use openssl::asn1::Asn1Time;
use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::PKey;
use openssl::rsa::Rsa;
use openssl::x509::extension::{BasicConstraints, SubjectAlternativeName};
use openssl::x509::{X509Builder, X509NameBuilder};
use presence_core::config::{AuthMode, Config};
use presence_core::{Secret, Shutdown};
use presence_testkit::{eventually, isolated_config, unique};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECRET: &str = "test-secret-test-secret-test-secret-123";
const ISSUER: &str = "https://idp.test";
const AUDIENCE: &str = "presence";

fn now() -> u64 {
    presence_gateway::auth::now_secs()
}

/// A signing key of the test's "identity provider" and its public JWK.
struct Signer {
    key: EncodingKey,
    alg: Algorithm,
    kid: String,
    jwk: Jwk,
    /// The public key as PEM (RSA only), what an attacker would use as an HMAC secret.
    public_pem: Vec<u8>,
}

impl Signer {
    fn new(key: EncodingKey, alg: Algorithm, kid: &str, public_pem: Vec<u8>) -> Signer {
        let mut jwk = Jwk::from_encoding_key(&key, alg).expect("public JWK");
        jwk.common.key_id = Some(kid.to_string());
        Signer {
            key,
            alg,
            kid: kid.to_string(),
            jwk,
            public_pem,
        }
    }

    fn rsa(kid: &str) -> Signer {
        let rsa = Rsa::generate(2048).expect("RSA key");
        let der = rsa.private_key_to_der().expect("PKCS#1");
        let pem = rsa.public_key_to_pem().expect("public PEM");
        Signer::new(EncodingKey::from_rsa_der(&der), Algorithm::RS256, kid, pem)
    }

    fn ec(kid: &str) -> Signer {
        let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).expect("P-256");
        let key = PKey::from_ec_key(EcKey::generate(&group).expect("EC key")).expect("pkey");
        let der = key.private_key_to_pkcs8().expect("PKCS#8");
        Signer::new(
            EncodingKey::from_ec_der(&der),
            Algorithm::ES256,
            kid,
            vec![],
        )
    }

    fn ed(kid: &str) -> Signer {
        let key = PKey::generate_ed25519().expect("Ed25519 key");
        let der = key.private_key_to_pkcs8().expect("PKCS#8");
        Signer::new(
            EncodingKey::from_ed_der(&der),
            Algorithm::EdDSA,
            kid,
            vec![],
        )
    }

    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        encode(&header, claims, &self.key).expect("sign")
    }
}

/// Claims that pass every check; tests change one thing at a time.
fn claims() -> Value {
    let now = now();
    json!({"sub": "u-1", "facility": "f-1", "region": "a", "iss": ISSUER, "aud": AUDIENCE,
           "iat": now, "exp": now + 600})
}

fn with(mut base: Value, changes: Value) -> Value {
    for (k, v) in changes.as_object().expect("object") {
        if v.is_null() {
            base.as_object_mut().expect("object").remove(k);
        } else {
            base[k] = v.clone();
        }
    }
    base
}

fn jwks(signers: &[&Signer]) -> String {
    serde_json::to_string(&JwkSet {
        keys: signers.iter().map(|s| s.jwk.clone()).collect(),
    })
    .expect("JWKS")
}

/// A file or directory under the temp dir, removed on drop.
struct Temp(PathBuf);

impl Temp {
    fn new(name: &str) -> Temp {
        Temp(std::env::temp_dir().join(unique(name)))
    }
    fn path(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

struct Gateway {
    base: String,
    shutdown: Shutdown,
    http: reqwest::Client,
    config: Config,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

/// A gateway with tokens on, `change` applied to its config. No topic is created: these
/// tests post no heartbeat. Regions `a` and `b` exist in its Redis (the notifier's region
/// set), so that streams of them may open.
async fn start(change: impl FnOnce(&mut Config)) -> Gateway {
    let mut config = isolated_config();
    config.gateway.auth = AuthMode::Jwt;
    config.gateway.jwt_secret = Secret::new(SECRET);
    config.gateway.jwt_leeway = Duration::ZERO;
    config.gateway.jwt_issuer = ISSUER.into();
    config.gateway.jwt_audience = AUDIENCE.into();
    config.gateway.jwt_max_lifetime = Duration::from_secs(3600);
    change(&mut config);
    let mut redis = redis_conn(&config).await;
    let keys = presence_core::delivery::RedisKeys::new(&config.redis.key_prefix);
    let _: () = redis::cmd("SADD")
        .arg(keys.regions())
        .arg("a")
        .arg("b")
        .query_async(&mut redis)
        .await
        .expect("SADD regions");
    let shutdown = Shutdown::new();
    let running = presence_gateway::start(config.clone(), shutdown.clone())
        .await
        .expect("gateway starts");
    Gateway {
        base: format!("http://{}", running.addr),
        shutdown,
        http: reqwest::Client::new(),
        config,
    }
}

async fn redis_conn(c: &Config) -> redis::aio::MultiplexedConnection {
    redis::Client::open(c.redis.url.expose())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis")
}

impl Gateway {
    /// Deletes what `start` wrote to Redis.
    async fn cleanup(&self) {
        let mut redis = redis_conn(&self.config).await;
        let keys = presence_core::delivery::RedisKeys::new(&self.config.redis.key_prefix);
        let _: Result<(), _> = redis::cmd("DEL")
            .arg(keys.regions())
            .query_async(&mut redis)
            .await;
    }

    /// Exchanges `token` for a stream ticket: (status, body).
    async fn ticket(&self, token: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self
            .http
            .post(format!("{}/v1/stream-tickets", self.base))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.expect("ticket request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// The token's verdict: "ok" or the error code.
    async fn verdict(&self, token: &str) -> String {
        match self.ticket(token, None).await {
            (200, _) => "ok".into(),
            (_, body) => body["error"].as_str().unwrap_or("?").to_string(),
        }
    }

    /// (status, error body); a success's body (a stream, maybe) is not read.
    async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        if r.status().is_success() {
            return (status, Value::Null);
        }
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn ticket_for(&self, token: &str, region: &str) -> String {
        let (status, body) = self.ticket(token, Some(json!({"regions": [region]}))).await;
        assert_eq!(status, 200, "{body}");
        body["ticket"].as_str().expect("ticket").to_string()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_file_tokens_and_every_jwt_edge() {
    let (rsa, ec, ed) = (Signer::rsa("rsa-1"), Signer::ec("ec-1"), Signer::ed("ed-1"));
    let file = Temp::new("jwks");
    std::fs::write(&file.0, jwks(&[&rsa, &ec, &ed])).expect("write JWKS");
    let g = start(|c| c.gateway.jwks_file = file.path()).await;
    let now = now();

    for s in [&rsa, &ec, &ed] {
        assert_eq!(g.verdict(&s.sign(&claims())).await, "ok", "{:?}", s.alg);
    }
    // HS256 with the configured secret still works (local use).
    let hs = encode(
        &Header::new(Algorithm::HS256),
        &claims(),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("HS256");
    assert_eq!(g.verdict(&hs).await, "ok");

    let attacker = Signer::rsa("rsa-1");
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "wrong audience",
            rsa.sign(&with(claims(), json!({"aud": "someone-else"}))),
            "token_audience",
        ),
        (
            "no audience",
            rsa.sign(&with(claims(), json!({"aud": null}))),
            "token_audience",
        ),
        (
            "wrong issuer",
            ec.sign(&with(claims(), json!({"iss": "https://evil.test"}))),
            "token_issuer",
        ),
        (
            "no issuer",
            ed.sign(&with(claims(), json!({"iss": null}))),
            "token_issuer",
        ),
        (
            "expired",
            rsa.sign(&with(claims(), json!({"iat": now - 120, "exp": now - 60}))),
            "token_expired",
        ),
        (
            "not yet valid",
            ec.sign(&with(claims(), json!({"nbf": now + 300}))),
            "token_not_yet_valid",
        ),
        (
            "lifetime over jwt_max_lifetime (exp - iat)",
            ed.sign(&with(claims(), json!({"iat": now, "exp": now + 7200}))),
            "token_lifetime",
        ),
        (
            "lifetime over jwt_max_lifetime (exp - now, no iat)",
            rsa.sign(&with(claims(), json!({"iat": null, "exp": now + 7200}))),
            "token_lifetime",
        ),
        (
            "unknown kid",
            Signer::rsa("rsa-unknown").sign(&claims()),
            "token_unknown_key",
        ),
        (
            "a known kid, another key (forged)",
            attacker.sign(&claims()),
            "token_forged",
        ),
        ("alg none", alg_none(&claims(), "rsa-1"), "token_algorithm"),
        (
            "HS256 signed with the RSA public key as secret (HS/RS confusion)",
            hs_with_secret(&rsa.public_pem, "rsa-1"),
            "token_forged",
        ),
        (
            "RS256 naming the EC key",
            {
                let mut header = Header::new(Algorithm::RS256);
                header.kid = Some("ec-1".into());
                encode(&header, &claims(), &rsa.key).expect("sign")
            },
            "token_algorithm",
        ),
        (
            "a key of its own in the header (jwk)",
            {
                let mut header = Header::new(Algorithm::RS256);
                header.kid = Some("rsa-1".into());
                header.jwk = Some(attacker.jwk.clone());
                encode(&header, &claims(), &attacker.key).expect("sign")
            },
            "token_forged",
        ),
    ];
    for (what, token, code) in cases {
        assert_eq!(g.verdict(&token).await, code, "{what}");
    }

    // Without an HS256 secret, an HS256 token is refused for its algorithm whatever it
    // was signed with.
    let only_jwks = start(|c| {
        c.gateway.jwks_file = file.path();
        c.gateway.jwt_secret = Secret::default();
    })
    .await;
    assert_eq!(
        only_jwks
            .verdict(&hs_with_secret(&rsa.public_pem, "rsa-1"))
            .await,
        "token_algorithm"
    );
    assert_eq!(only_jwks.verdict(&rsa.sign(&claims())).await, "ok");
    only_jwks.cleanup().await;
    g.cleanup().await;
}

/// `{"alg":"none"}`, the claims, and an empty signature.
fn alg_none(claims: &Value, kid: &str) -> String {
    let header = json!({"alg": "none", "typ": "JWT", "kid": kid});
    format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

fn hs_with_secret(secret: &[u8], kid: &str) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(kid.into());
    encode(&header, &claims(), &EncodingKey::from_secret(secret)).expect("HS256")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_in_the_jwks_file() {
    let (old, new) = (Signer::ec("2026-01"), Signer::ed("2026-02"));
    let file = Temp::new("jwks");
    std::fs::write(&file.0, jwks(&[&old])).expect("write JWKS");
    let g = start(|c| {
        c.gateway.jwks_file = file.path();
        c.gateway.jwks_refresh_min = Duration::from_secs(1);
        c.gateway.jwks_max_age = Duration::from_secs(2);
    })
    .await;
    assert_eq!(g.verdict(&old.sign(&claims())).await, "ok");

    // The provider rotates: the new key replaces the old one. A token with the new kid is
    // accepted once the file is read again (at most once per jwks_refresh_min)...
    std::fs::write(&file.0, jwks(&[&new])).expect("rotate JWKS");
    let fresh = new.sign(&claims());
    let (gw, token) = (&g, &fresh);
    eventually(
        "the new kid is accepted",
        Duration::from_secs(10),
        || async move { (gw.verdict(token).await == "ok").then_some(()) },
    )
    .await;
    // ... and the removed one is refused from then on.
    let stale = old.sign(&claims());
    assert_eq!(g.verdict(&stale).await, "token_unknown_key");
    assert_eq!(g.verdict(&fresh).await, "ok");
    // A key withdrawn with no new kid to prompt a read stops working once the keys are
    // older than jwks_max_age.
    std::fs::write(&file.0, jwks(&[])).expect("withdraw every key");
    let withdrawn = eventually(
        "the withdrawn key is refused",
        Duration::from_secs(10),
        || async move {
            let v = gw.verdict(token).await;
            (v != "ok").then_some(v)
        },
    )
    .await;
    assert_eq!(withdrawn, "token_unknown_key");
    g.cleanup().await;
}

/// A one-connection-at-a-time https server that answers every request with `body`, and
/// counts requests.
struct JwksServer {
    url: String,
    ca_pem: Temp,
    body: Arc<Mutex<String>>,
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl JwksServer {
    async fn start(body: String) -> JwksServer {
        let (cert_pem, key_pem) = self_signed_cert();
        let ca_pem = Temp::new("jwks-ca.pem");
        std::fs::write(&ca_pem.0, &cert_pem).expect("write CA");
        let identity = native_tls::Identity::from_pkcs8(&cert_pem, &key_pem).expect("identity");
        let acceptor = tokio_native_tls::TlsAcceptor::from(
            native_tls::TlsAcceptor::new(identity).expect("TLS acceptor"),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!(
            "https://127.0.0.1:{}/.well-known/jwks.json",
            listener.local_addr().expect("addr").port()
        );
        let body = Arc::new(Mutex::new(body));
        let requests = Arc::new(AtomicUsize::new(0));
        let (b, n) = (body.clone(), requests.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => request.extend_from_slice(&buf[..k]),
                    }
                }
                n.fetch_add(1, Ordering::SeqCst);
                let json = b.lock().expect("body").clone();
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{json}",
                    json.len()
                );
                let _ = tls.write_all(response.as_bytes()).await;
                let _ = tls.shutdown().await;
            }
        });
        JwksServer {
            url,
            ca_pem,
            body,
            requests,
            task,
        }
    }
}

/// A self-signed certificate for 127.0.0.1 (its own CA), and its PKCS#8 key, as PEM.
fn self_signed_cert() -> (Vec<u8>, Vec<u8>) {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).expect("P-256");
    let key = PKey::from_ec_key(EcKey::generate(&group).expect("key")).expect("pkey");
    let mut name = X509NameBuilder::new().expect("name");
    name.append_entry_by_text("CN", "presence test JWKS")
        .expect("CN");
    let name = name.build();
    let mut b = X509Builder::new().expect("builder");
    b.set_version(2).expect("v3");
    let serial = BigNum::from_u32(1)
        .and_then(|n| n.to_asn1_integer())
        .expect("serial");
    b.set_serial_number(&serial).expect("serial");
    b.set_subject_name(&name).expect("subject");
    b.set_issuer_name(&name).expect("issuer");
    b.set_pubkey(&key).expect("pubkey");
    b.set_not_before(&Asn1Time::days_from_now(0).expect("time"))
        .expect("not before");
    b.set_not_after(&Asn1Time::days_from_now(1).expect("time"))
        .expect("not after");
    b.append_extension(BasicConstraints::new().critical().ca().build().expect("bc"))
        .expect("bc");
    let san = SubjectAlternativeName::new()
        .ip("127.0.0.1")
        .dns("localhost")
        .build(&b.x509v3_context(None, None))
        .expect("SAN");
    b.append_extension(san).expect("SAN");
    b.sign(&key, MessageDigest::sha256()).expect("sign");
    (
        b.build().to_pem().expect("cert PEM"),
        key.private_key_to_pem_pkcs8().expect("key PEM"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_url_over_https_is_cached_and_made_up_kids_cannot_hammer_it() {
    let (rsa, ed) = (Signer::rsa("url-rsa"), Signer::ed("url-ed"));
    let server = JwksServer::start(jwks(&[&rsa])).await;
    let g = start(|c| {
        c.gateway.jwt_secret = Secret::default();
        c.gateway.jwks_url = server.url.clone();
        c.gateway.jwks_ca_file = server.ca_pem.path();
        c.gateway.jwks_refresh_min = Duration::from_secs(2);
    })
    .await;
    // The first token fetches the keys; later ones use the cache.
    for _ in 0..3 {
        assert_eq!(g.verdict(&rsa.sign(&claims())).await, "ok");
    }
    assert_eq!(server.requests.load(Ordering::SeqCst), 1, "cached");
    // Fifty made-up kids within the refresh interval: refused, and no fetch at all (the
    // first fetch was under 2 s ago).
    let started = Instant::now();
    for i in 0..50 {
        let token = Signer::ed(&format!("made-up-{i}")).sign(&claims());
        assert_eq!(g.verdict(&token).await, "token_unknown_key");
    }
    if started.elapsed() < Duration::from_secs(2) {
        assert_eq!(server.requests.load(Ordering::SeqCst), 1, "rate-limited");
    }
    assert!(server.requests.load(Ordering::SeqCst) <= 1 + started.elapsed().as_secs() as usize);
    // A rotation at the provider is picked up on the new kid once a fetch is due.
    *server.body.lock().expect("body") = jwks(&[&rsa, &ed]);
    let fresh = ed.sign(&claims());
    let (gw, token) = (&g, &fresh);
    eventually(
        "the new kid from the URL is accepted",
        Duration::from_secs(10),
        || async move { (gw.verdict(token).await == "ok").then_some(()) },
    )
    .await;

    // Without the private CA the provider is not trusted: no keys, so 503 (retry later),
    // not a verdict on the token.
    let untrusting = start(|c| {
        c.gateway.jwt_secret = Secret::default();
        c.gateway.jwks_url = server.url.clone();
    })
    .await;
    assert_eq!(
        untrusting.verdict(&rsa.sign(&claims())).await,
        "keys_unavailable"
    );
    untrusting.cleanup().await;
    g.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_tickets_are_region_scoped_short_lived_and_end_with_the_grant() {
    let g = start(|c| c.gateway.stream_ticket_ttl = Duration::from_secs(3)).await;
    let token = |region: &str, exp: u64| {
        encode(
            &Header::new(Algorithm::HS256),
            &with(claims(), json!({"region": region, "exp": exp})),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .expect("HS256")
    };
    let for_a = token("a", now() + 600);

    // A ticket for region a opens a's stream, not b's.
    let ticket = g.ticket_for(&for_a, "a").await;
    let r = g
        .http
        .get(format!("{}/v1/regions/a/stream?ticket={ticket}", g.base))
        .send()
        .await
        .expect("stream");
    assert_eq!(r.status().as_u16(), 200);
    drop(r);
    let (status, body) = g
        .get(&format!("/v1/regions/b/stream?ticket={ticket}"))
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("region_not_granted"))
    );
    // Nor can a token for a buy a ticket for b.
    let (status, _) = g.ticket(&for_a, Some(json!({"regions": ["b"]}))).await;
    assert_eq!(status, 403);
    // An altered ticket, and no ticket at all.
    let mut altered = ticket.clone().into_bytes();
    altered[10] = if altered[10] == b'B' { b'C' } else { b'B' };
    let altered = String::from_utf8(altered).expect("ASCII");
    let (status, body) = g
        .get(&format!("/v1/regions/a/stream?ticket={altered}"))
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("ticket_invalid"))
    );
    assert_eq!(g.get("/v1/regions/a/stream").await.0, 401);

    // A long-lived token in a URL is refused on streams and reads.
    for path in [
        format!("/v1/regions/a/stream?access_token={for_a}"),
        format!("/v1/regions/a/facilities?access_token={for_a}"),
        format!("/v1/regions?access_token={for_a}"),
        format!("/v1/facilities/f-1/history?access_token={for_a}"),
    ] {
        let (status, body) = g.get(&path).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("token_in_url")),
            "{path}"
        );
    }

    // A ticket not used within stream_ticket_ttl is refused.
    let ticket = g.ticket_for(&for_a, "a").await;
    let (gw, path) = (&g, &format!("/v1/regions/a/stream?ticket={ticket}"));
    let (status, body) = eventually(
        "the unused ticket expires",
        Duration::from_secs(10),
        || async move {
            let (status, body) = gw.get(path).await;
            (status != 200).then_some((status, body))
        },
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("ticket_expired"))
    );

    // A stream ends when the token behind its ticket expires: the last event says so.
    let exp = now() + 3;
    let short = token("a", exp);
    let ticket = g.ticket_for(&short, "a").await;
    let mut r = g
        .http
        .get(format!("{}/v1/regions/a/stream?ticket={ticket}", g.base))
        .send()
        .await
        .expect("stream");
    assert_eq!(r.status().as_u16(), 200);
    let mut text = String::new();
    let ended = tokio::time::timeout(Duration::from_secs(15), async {
        while let Ok(Some(chunk)) = r.chunk().await {
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await;
    assert!(ended.is_ok(), "the stream outlived its grant: {text}");
    assert!(now() >= exp, "the stream ended before its grant expired");
    assert!(text.contains("event: snapshot"), "{text}");
    assert!(text.contains("event: expired"), "{text}");
    // Reconnecting with the same ticket is refused: the grant is over.
    let (status, _) = g
        .get(&format!("/v1/regions/a/stream?ticket={ticket}"))
        .await;
    assert_eq!(status, 401);
    g.cleanup().await;
}

/// The dashboard in headless Chromium (tests/browser/dashboard-ticket.cjs): it asks for a
/// token, exchanges it for a ticket, and never puts the token in a URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_streams_with_a_ticket_and_keeps_the_token_out_of_urls() {
    let g = start(|_| {}).await;
    let token = encode(
        &Header::new(Algorithm::HS256),
        &claims(),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("HS256");
    let (base, t) = (g.base.clone(), token.clone());
    let seen = tokio::task::spawn_blocking(move || {
        presence_testkit::browser_script("dashboard-ticket.cjs", &[&base, "a", &t])
    })
    .await
    .expect("join");
    assert!(
        seen["asked"]
            .as_str()
            .unwrap_or("")
            .contains("enter a token"),
        "{seen}"
    );
    assert_eq!(seen["live"], "live · region a", "{seen}");
    assert_eq!(seen["stored"], "set", "{seen}");
    for key in ["address", "old_address"] {
        let url = seen[key].as_str().unwrap_or("");
        assert!(
            url.contains("region=a") && !url.contains("access_token") && !url.contains(&token),
            "{key}: {url}"
        );
    }
    let streams = seen["stream_urls"].as_array().cloned().unwrap_or_default();
    assert!(!streams.is_empty(), "{seen}");
    for u in &streams {
        let u = u.as_str().unwrap_or("");
        assert!(
            u.contains("?ticket=") && !u.contains(&token),
            "stream URL {u}"
        );
    }
    // Only the deliberately old link itself carried the token.
    assert_eq!(seen["leaked"], 1, "{seen}");
    g.cleanup().await;
}
