use super::*;

#[test]
fn empty_config_resolves_to_paper_cifar10_defaults() {
    let c = Config::parse("", "<string>").unwrap();
    assert_eq!(c.model.ch, 128);
    assert_eq!(c.model.ch_mult, vec![1, 2, 2, 2]);
    assert_eq!(c.diffusion.num_timesteps, 1000);
    assert_eq!(c.diffusion.beta_start, 1e-4);
    assert_eq!(c.diffusion.beta_end, 0.02);
    assert_eq!(c.train.lr, 2e-4);
    assert_eq!(c.train.ema_decay, 0.9999);
}

#[test]
fn unknown_key_is_named() {
    let err = Config::parse("[model]\nchannels = 3\n", "x.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("channels"), "{err}");
    assert!(err.contains("x.toml"), "{err}");
    let err = Config::parse("[modle]\nch = 3\n", "x.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("modle"), "{err}");
}

#[test]
fn invalid_values_name_their_key() {
    let cases = [
        ("[model]\nch = 100\n", "model.ch"),
        ("[model]\nch_mult = []\n", "model.ch_mult"),
        (
            "[model]\nattn_resolutions = [12]\n",
            "model.attn_resolutions",
        ),
        ("[data]\nresolution = 36\n", "data.resolution"),
        ("[data]\nchannels = 2\n", "data.channels"),
        ("[data]\nsource = \"nocolon\"\n", "data.source"),
        ("[diffusion]\nbeta_end = 1.5\n", "diffusion.beta_end"),
        (
            "[diffusion]\nmodel_var_type = \"learned\"\n",
            "diffusion.loss_type",
        ),
        ("[train]\nlr = -1.0\n", "train.lr"),
        ("[train]\nadam_beta2 = 1.0\n", "train.adam_beta2"),
        ("[train]\nema_decay = 1.0\n", "train.ema_decay"),
        ("[sample]\nsteps = 0\n", "sample.steps"),
        ("[run]\nname = \"../x\"\n", "run.name"),
        ("[checkpoint]\nkeep_last = 1\n", "checkpoint.keep_last"),
        ("[checkpoint]\nurl = \"runs/x\"\n", "checkpoint.url"),
        ("[distributed]\nworld_size = 0\n", "distributed.world_size"),
        (
            "[train]\nbatch_size = 2\n[distributed]\nworld_size = 3\n",
            "distributed.world_size",
        ),
        (
            "[distributed]\nlisten = \"localhost\"\n",
            "distributed.listen",
        ),
        (
            "[auth]\ntoken_file = \"t\"\ntoken_env = \"T\"\n",
            "auth.token_env",
        ),
        ("[auth]\ntoken_env = \"s3cr3t-value!\"\n", "auth.token_env"),
        ("[tls]\ncert_file = \"c.pem\"\n", "tls.key_file"),
        (
            "[tls]\nclient_cert_file = \"c.pem\"\n",
            "tls.client_key_file",
        ),
        ("[tls]\nclient_ca_file = \"ca.pem\"\n", "tls.client_ca_file"),
        ("[distributed]\nbucket_mb = 0\n", "distributed.bucket_mb"),
        ("[distributed]\nlease_secs = 0\n", "distributed.lease_secs"),
        (
            "[elastic]\nmin_workers = 3\nmax_workers = 2\n",
            "elastic.min_workers",
        ),
        (
            "[distributed]\nworld_size = 3\n[elastic]\nmax_workers = 2\n",
            "elastic.max_workers",
        ),
        (
            "[train]\nbatch_size = 4\n[elastic]\nmax_workers = 5\n",
            "elastic.max_workers",
        ),
        (
            "[elastic]\nrendezvous_grace_secs = -1.0\n",
            "elastic.rendezvous_grace_secs",
        ),
    ];
    for (text, key) in cases {
        match Config::parse(text, "c.toml") {
            Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "for {text:?}"),
            other => panic!("{text:?}: expected Invalid({key}), got {other:?}"),
        }
    }
}

#[test]
fn bad_enum_value_is_a_parse_error_naming_the_value() {
    let err = Config::parse("[diffusion]\nloss_type = \"l1\"\n", "c.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("l1") && err.contains("loss_type"), "{err}");
}

#[test]
fn resolved_config_round_trips_through_toml() {
    let c = Config::parse(
        "[model]\nch = 64\n[diffusion]\nloss_type = \"kl\"\nmodel_var_type = \"learned\"\n",
        "c",
    )
    .unwrap();
    let again = Config::parse(&c.to_toml(), "again").unwrap();
    assert_eq!(c, again);
}

#[test]
fn shipped_configs_parse() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "toml") {
            Config::from_file(&p).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
    assert!(n >= 6, "expected the six shipped configs, found {n}");
}

#[test]
fn credentials_in_store_options_are_redacted_when_written_out() {
    let c = Config::parse(
        "[checkpoint]\nurl = \"s3://b/ckpt\"\n[checkpoint.options]\naws_region = \"eu-west-1\"\naws_secret_access_key = \"hunter2\"\naws_session_token = \"tok\"\n",
        "t.toml",
    )
    .unwrap();
    assert_eq!(c.checkpoint.options["aws_secret_access_key"], "hunter2");
    for text in [c.to_toml(), c.to_json().to_string()] {
        assert!(
            !text.contains("hunter2") && !text.contains("\"tok\""),
            "{text}"
        );
        assert!(
            text.contains("eu-west-1") && text.contains("<redacted>"),
            "{text}"
        );
    }
}

#[test]
fn rank_rows_partition_a_global_batch_into_near_equal_shares() {
    for global in 1..20 {
        for world in 1..=global {
            let shares: Vec<_> = (0..world)
                .map(|r| crate::rank_rows(global, world, r))
                .collect();
            assert_eq!(shares[0].start, 0);
            assert_eq!(shares[world - 1].end, global);
            for w in shares.windows(2) {
                assert_eq!(w[0].end, w[1].start);
            }
            let lens: Vec<usize> = shares.iter().map(|s| s.len()).collect();
            let (lo, hi) = (lens.iter().min().unwrap(), lens.iter().max().unwrap());
            assert!(hi - lo <= 1 && *lo >= 1, "{global} over {world}: {lens:?}");
        }
    }
    assert_eq!(crate::rank_rows(8, 3, 1), 2..5);
}

#[test]
fn redacted_options_come_from_the_environment_or_are_named() {
    let mut cfg = Config::default();
    cfg.checkpoint.options = std::collections::BTreeMap::from([
        (
            "aws_endpoint".to_string(),
            "http://127.0.0.1:9000".to_string(),
        ),
        ("aws_secret_access_key".to_string(), "s3cr3t".to_string()),
    ]);
    let sent = cfg.redacted();
    let none = |_: &str| None;
    let err = sent.clone().restore_redacted(none).unwrap_err().to_string();
    assert!(
        err.contains("checkpoint.options.aws_secret_access_key")
            && err.contains("set AWS_SECRET_ACCESS_KEY"),
        "{err}"
    );
    let set = |v: &str| (v == "AWS_SECRET_ACCESS_KEY").then(|| "s3cr3t".to_string());
    let mut got = sent;
    got.restore_redacted(set).unwrap();
    assert_eq!(
        got.checkpoint.options.keys().collect::<Vec<_>>(),
        ["aws_endpoint"],
        "the redacted key is dropped (object_store reads the variable), the rest kept"
    );
}

#[test]
fn the_token_itself_is_not_a_config_key() {
    let err = Config::parse("[auth]\ntoken = \"s3cr3t\"\n", "x.toml")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("token") && err.contains("token_file") && err.contains("x.toml"),
        "{err}"
    );
    let ok = Config::parse(
        "[auth]\ntoken_env = \"DDPM_AUTH_TOKEN\"\n[tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\nclient_ca_file = \"ca.pem\"\n",
        "x.toml",
    )
    .unwrap();
    assert_eq!(ok.auth.token_env, "DDPM_AUTH_TOKEN");
    assert_eq!(ok.tls.client_ca_file, "ca.pem");
    // Written out (checkpoint manifests, the config handed to workers) as it was: names only.
    assert!(ok.to_toml().contains("token_env = \"DDPM_AUTH_TOKEN\""));
}

#[test]
fn elastic_bounds_default_to_the_world_size() {
    let c = Config::parse("[distributed]\nworld_size = 3\n", "c.toml").unwrap();
    assert_eq!(c.elastic_bounds(), (3, 3));
    let c = Config::parse(
        "[distributed]\nworld_size = 3\n[elastic]\nmin_workers = 2\nmax_workers = 4\n",
        "c.toml",
    )
    .unwrap();
    assert_eq!(c.elastic_bounds(), (2, 4));
}
