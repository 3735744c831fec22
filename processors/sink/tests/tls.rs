//! The sink against PostgreSQL of its own with TLS on a CA this test makes: under
//! `verify-full` (and a client certificate) the sink applies a batch over an encrypted
//! connection; a wrong CA, a host the certificate does not name, a missing client
//! certificate and plain text are each refused with what to change; `sslmode=require`
//! against a server without TLS is refused.

use std::time::Duration;

use presence_core::config::DatabaseConfig;
use presence_core::delivery::{connect_postgres, Tables};
use presence_core::{Secret, Shutdown};
use presence_testkit::{
    ensure_topics, eventually, isolated_config, produce, spawn_process, status_records, transition,
    PrivateService, TestCerts,
};

fn database(url: String, certs: Option<&TestCerts>) -> DatabaseConfig {
    DatabaseConfig {
        url: Secret::new(url),
        ca_file: certs.map(|c| c.path("ca.crt")),
        client_cert_file: certs.map(|c| c.path("client.crt")),
        client_key_file: certs.map(|c| c.path("client.key")),
        ..DatabaseConfig::default()
    }
}

/// The connection error, or a panic naming `what` if it connected.
async fn refused(db: &DatabaseConfig, what: &str) -> String {
    match connect_postgres(db).await {
        Ok(_) => panic!("{what}: connected"),
        Err(e) => e,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sink_writes_under_verify_full_and_wrong_trust_or_names_are_refused() {
    let certs = TestCerts::new();
    // TLS only, and a client certificate signed by the test CA besides the password.
    let server = PrivateService::postgres()
        .with_tls(&certs)
        .with_env("PG_TLS_CA", certs.path("ca.crt").display());
    server.start();
    let port = server.port();
    let user = "presence:presence";

    let mut config = isolated_config();
    let _topics = presence_testkit::TestTopics::own(&config);
    config.database = DatabaseConfig {
        schema: config.database.schema.clone(),
        ..database(
            format!("postgres://{user}@127.0.0.1:{port}/presence?sslmode=verify-full"),
            Some(&certs),
        )
    };
    assert_eq!(config.problems(), Vec::<String>::new());

    let client = connect_postgres(&config.database)
        .await
        .expect("verify-full with the right CA");
    let encrypted: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0);
    assert!(encrypted, "the connection is not encrypted");

    ensure_topics(&config).await;
    produce(
        &config,
        &config.topics.facility_status,
        &status_records(&[
            transition("a", "north", 1, true),
            transition("b", "north", 1, true),
            transition("a", "north", 2, false),
        ]),
    )
    .await;
    let shutdown = Shutdown::new();
    let c = config.clone();
    spawn_process("sink", &shutdown, |s| presence_sink::run(c, s));
    let history = Tables::new(&config.database.schema).history();
    eventually(
        "three transitions in the history, written over TLS",
        Duration::from_secs(30),
        || {
            let (client, sql) = (&client, format!("SELECT count(*) FROM {history}"));
            async move {
                let n: i64 = client.query_one(&sql, &[]).await.ok()?.get(0);
                (n == 3).then_some(())
            }
        },
    )
    .await;
    shutdown.trigger();

    // A CA that did not sign the server's certificate.
    let mut wrong_ca = config.database.clone();
    wrong_ca.ca_file = Some(certs.path("other-ca.crt"));
    let e = refused(&wrong_ca, "wrong CA").await;
    assert!(
        e.contains("not signed by the CA") && e.contains("set database.ca_file"),
        "{e}"
    );

    // The right CA, but a host name the certificate does not list (reached at 127.0.0.1).
    let url = format!(
        "postgres://{user}@db.invalid:{port}/presence?hostaddr=127.0.0.1&sslmode=verify-full"
    );
    let e = refused(&database(url.clone(), Some(&certs)), "host mismatch").await;
    assert!(
        e.contains("not issued for host 'db.invalid'") && e.contains("verify-ca"),
        "{e}"
    );
    // verify-ca checks the CA only, so the same server and name are accepted.
    connect_postgres(&database(
        url.replace("verify-full", "verify-ca"),
        Some(&certs),
    ))
    .await
    .expect("verify-ca ignores the host name");

    // No client certificate: the server ends the handshake.
    let mut anonymous = config.database.clone();
    anonymous.client_cert_file = None;
    anonymous.client_key_file = None;
    let e = refused(&anonymous, "no client certificate").await;
    assert!(e.contains("client_cert_file"), "{e}");

    // Plain text: the server takes TCP logins over TLS only.
    let plain = database(
        format!("postgres://{user}@127.0.0.1:{port}/presence?sslmode=disable"),
        None,
    );
    let e = refused(&plain, "sslmode=disable").await;
    assert!(e.contains("no encryption"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_against_a_server_without_tls_is_refused() {
    let server = PrivateService::postgres();
    server.start();
    let url = format!(
        "postgres://presence:presence@127.0.0.1:{}/presence",
        server.port()
    );
    let e = refused(&database(format!("{url}?sslmode=require"), None), "require").await;
    assert!(
        e.contains("does not offer TLS") && e.contains("sslmode=require"),
        "{e}"
    );
    // prefer (the default without a CA) falls back to plain text, as libpq does.
    let client = connect_postgres(&database(url, None))
        .await
        .expect("prefer without TLS");
    let encrypted: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0);
    assert!(!encrypted);
}
