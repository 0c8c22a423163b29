use super::*;
use tonic::metadata::MetadataValue;

const TOKEN: &str = "0123456789abcdef-the-run-token";

fn request(auth: Option<&str>) -> Request<()> {
    let mut r = Request::new(());
    if let Some(a) = auth {
        r.metadata_mut()
            .insert("authorization", MetadataValue::try_from(a).unwrap());
    }
    r
}

#[test]
fn tokens_are_checked_trimmed_and_never_printed() {
    let t = Token::parse(&format!("  {TOKEN}\n"), "file t").unwrap();
    assert_eq!(t.expose(), TOKEN);
    assert_eq!(format!("{t:?}"), "Token(<redacted>)");
    let err = Token::parse("short", "file t").unwrap_err().to_string();
    assert!(
        err.contains("file t") && err.contains("at least 16"),
        "{err}"
    );
    let err = Token::parse("0123456789 abcdefgh", "variable X")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("variable X") && err.contains("visible ASCII"),
        "{err}"
    );
    assert!(
        !err.contains("abcdefgh"),
        "the error repeats no part of the token: {err}"
    );
}

#[test]
fn token_sources_name_the_file_or_variable_at_fault() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let err = Token::from_file(&missing).unwrap_err().to_string();
    assert!(err.contains(&missing.display().to_string()), "{err}");
    let err = Token::from_env("DDPM_AUTH_TEST_SURELY_UNSET", "auth.token_env")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("DDPM_AUTH_TEST_SURELY_UNSET") && err.contains("auth.token_env"),
        "{err}"
    );
    let file = dir.path().join("token");
    std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
    let cfg = AuthConfig {
        token_file: file.display().to_string(),
        token_env: String::new(),
    };
    assert_eq!(Token::from_config(&cfg).unwrap().unwrap().expose(), TOKEN);
    assert!(Token::from_config(&AuthConfig::default())
        .unwrap()
        .is_none());
}

#[test]
fn the_check_lets_only_the_right_token_through_and_drops_the_header() {
    let token = Token::parse(TOKEN, "t").unwrap();
    let mut check = BearerCheck::new(Some(&token));
    assert!(check.is_required());
    for (auth, reason) in [
        (None, "missing"),
        (Some("Basic dXNlcjpwYXNz".to_string()), "missing"),
        (Some(format!("bearer {TOKEN}")), "missing"),
        (
            Some("Bearer 0123456789abcdef-the-run-tokem".to_string()),
            "wrong",
        ),
        (Some(format!("Bearer {TOKEN}x")), "wrong"),
        (Some("Bearer ".to_string()), "wrong"),
    ] {
        let status = check.call(request(auth.as_deref())).unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{auth:?}");
        assert!(
            status
                .message()
                .starts_with(&format!("{reason} bearer token")),
            "{auth:?}: {}",
            status.message()
        );
        assert!(!status.message().contains(TOKEN), "{}", status.message());
    }
    let passed = check
        .call(request(Some(&format!("Bearer {TOKEN}"))))
        .unwrap();
    assert!(passed.metadata().get("authorization").is_none());
    // Without a configured token, everything passes.
    let mut open = BearerCheck::new(None);
    assert!(!open.is_required());
    open.call(request(None)).unwrap();
}

#[test]
fn the_client_interceptor_sends_what_the_check_expects() {
    let token = Token::parse(TOKEN, "t").unwrap();
    let security = ClientSecurity {
        token: Some(token.clone()),
        tls: ClientTls::default(),
    };
    let header = security.authorize_header().unwrap();
    let mut client = BearerToken(Some(header));
    assert_eq!(format!("{client:?}"), "BearerToken(<redacted>)");
    let sent = client.call(Request::new(())).unwrap();
    let mut check = BearerCheck::new(Some(&token));
    check.call(sent).unwrap();
}

#[test]
fn pem_files_are_checked_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let pki = test_pki::TestPki::write(dir.path()).unwrap();
    let tls = TlsConfig {
        cert_file: pki.server_cert.display().to_string(),
        key_file: pki.server_key.display().to_string(),
        client_ca_file: pki.ca.display().to_string(),
        ..TlsConfig::default()
    };
    assert!(server_tls(&tls).unwrap().is_some());
    assert!(server_tls(&TlsConfig::default()).unwrap().is_none());
    // A certificate where the key should be.
    let swapped = TlsConfig {
        key_file: pki.server_cert.display().to_string(),
        ..tls.clone()
    };
    let err = server_tls(&swapped).unwrap_err().to_string();
    assert!(
        err.contains("tls.key_file")
            && err.contains(&pki.server_cert.display().to_string())
            && err.contains("PRIVATE KEY"),
        "{err}"
    );
    let missing = TlsConfig {
        client_ca_file: dir.path().join("nope.pem").display().to_string(),
        ..tls
    };
    let err = server_tls(&missing).unwrap_err().to_string();
    assert!(
        err.contains("tls.client_ca_file") && err.contains("nope.pem"),
        "{err}"
    );
}

#[test]
fn endpoints_refuse_tls_files_with_http_and_odd_schemes() {
    let dir = tempfile::tempdir().unwrap();
    let pki = test_pki::TestPki::write(dir.path()).unwrap();
    let tls = ClientTls {
        ca_file: Some(pki.ca.clone()),
        ..ClientTls::default()
    };
    let plain = ClientSecurity::default();
    plain.endpoint("http://127.0.0.1:1").unwrap();
    let with_tls = ClientSecurity { token: None, tls };
    let err = with_tls
        .endpoint("http://127.0.0.1:1")
        .unwrap_err()
        .to_string();
    assert!(err.contains("use https://"), "{err}");
    let err = plain.endpoint("ftp://127.0.0.1:1").unwrap_err().to_string();
    assert!(err.contains("\"ftp\""), "{err}");
    with_tls.endpoint("https://127.0.0.1:1").unwrap();
    let half = ClientSecurity {
        token: None,
        tls: ClientTls {
            cert_file: Some(pki.client_cert.clone()),
            ..ClientTls::default()
        },
    };
    let err = half
        .endpoint("https://127.0.0.1:1")
        .unwrap_err()
        .to_string();
    assert!(err.contains("--tls-key"), "{err}");
}
