use super::*;

fn parse(json: &str) -> Result<Invocation, Error> {
    let req: RunRequest = serde_json::from_str(json).map_err(|e| invalid(e.to_string()))?;
    req.validate(&Limits::default())
}

fn refused(json: &str, needle: &str) {
    let e = parse(json).expect_err(json);
    assert_eq!(e.kind, crate::Kind::Invalid, "{json}");
    assert!(e.message.contains(needle), "{json}: {:?} lacks {needle:?}", e.message);
}

#[test]
fn each_program_form_is_understood() {
    assert_eq!(parse(r#"{"cmd":"echo hi"}"#).unwrap().program, Program::Shell("echo hi".into()));
    assert_eq!(
        parse(r#"{"argv":["ls","-l"]}"#).unwrap().program,
        Program::Argv(vec!["ls".into(), "-l".into()])
    );
    assert_eq!(
        parse(r#"{"lang":"python","code":"print(1)"}"#).unwrap().program,
        Program::Code { lang: Lang::Python, code: "print(1)".into() }
    );
}

#[test]
fn bad_requests_name_their_problem() {
    refused(r#"{}"#, "say what to run");
    refused(r#"{"cmd":"a","argv":["b"]}"#, "exactly one");
    refused(r#"{"code":"print(1)"}"#, "needs a lang");
    refused(r#"{"cmd":"x","lang":"python"}"#, "lang goes with code");
    refused(r#"{"lang":"ruby","code":"1"}"#, "unknown variant `ruby`");
    refused(r#"{"cmd":"x","bogus":1}"#, "unknown field `bogus`");
    refused(r#"{"cmd":"  "}"#, "non-empty");
    refused(r#"{"argv":[]}"#, "name a program");
    refused(r#"{"cmd":"x","timeout":"soon"}"#, "timeout \"soon\"");
    refused(r#"{"cmd":"x","timeout":"0s"}"#, "above zero");
    refused(r#"{"cmd":"x","env":{"A=B":"c"}}"#, "env");
    refused(r#"{"cmd":"x","stdin":"a","stdin_base64":"YQ=="}"#, "not both");
    refused(r#"{"cmd":"x","stdin_base64":"!!"}"#, "not base64");
    refused(r#"{"cmd":"x","files":[{"path":"../etc/passwd","content":""}]}"#, "files[0].path");
    refused(r#"{"cmd":"x","files":[{"path":"a","content":""},{"path":"/etc/x","content":""}]}"#, "files[1]");
    refused(r#"{"cmd":"x","files":[{"path":"a"}]}"#, "exactly one of content");
    refused(r#"{"cmd":"x","files":[{"path":"a","content":"","mode":4095}]}"#, "permission");
}

#[test]
fn timeout_is_checked_at_the_limit() {
    let limits = Limits::default();
    assert_eq!(parse(r#"{"cmd":"x"}"#).unwrap().timeout, limits.default_timeout);
    assert_eq!(parse(r#"{"cmd":"x","timeout":"5m"}"#).unwrap().timeout, limits.max_timeout);
    refused(r#"{"cmd":"x","timeout":"5m 1ms"}"#, "exceeds the limit of 5m");
}

#[test]
fn code_is_written_to_a_file_and_run_by_its_interpreter() {
    let inv =
        parse(r#"{"lang":"python","code":"print(1)","files":[{"path":"d/in.txt","content":"x"}]}"#).unwrap();
    let req = inv.into_exec("abc", &Limits::default(), false);
    let files = &req.files;
    assert_eq!(files.len(), 2);
    assert_eq!(files[1].path, "/tmp/.ember/abc.py");
    assert_eq!(files[1].content, b"print(1)");
    assert_eq!(
        req.command,
        Command::Python(ember_wire::PythonScript { path: "/tmp/.ember/abc.py".into(), args: vec![] })
    );
    assert_eq!(req.output_limit, Limits::default().max_output_bytes);
    assert!(req.kill_leftovers);
    let req = parse(r#"{"cmd":"sleep 9 &"}"#).unwrap().into_exec("x", &Limits::default(), true);
    assert!(!req.kill_leftovers, "sessions keep processes");
}

#[test]
fn binary_stdin_and_files_arrive_exactly() {
    let inv =
        parse(r#"{"cmd":"x","stdin_base64":"/wA=","files":[{"path":"b","content_base64":"AAE="}]}"#).unwrap();
    assert_eq!(inv.stdin, vec![0xff, 0]);
    assert_eq!(inv.files[0].content, vec![0, 1]);
}

#[test]
fn session_keys() {
    for ok in ["a", "agent-7", "x.y_z", &"k".repeat(64)] {
        check_session_key(ok).unwrap();
    }
    for bad in ["", "a b", "ä", "a/b", &"k".repeat(65)] {
        assert!(check_session_key(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn server_timing_reads_back_what_it_writes() {
    use std::time::Duration;
    let t = crate::api::Timing {
        claim: Duration::from_micros(12),
        vm: Duration::from_micros(48_500),
        run: Duration::from_micros(47_250),
        net: None,
    };
    let parsed = crate::api::Timing::parse_header(&t.header_value());
    let want: std::collections::BTreeMap<String, f64> =
        [("claim".to_string(), 0.012), ("run".to_string(), 47.25), ("vm".to_string(), 48.5)].into();
    assert_eq!(parsed, want);
    let net = crate::api::NetTiming {
        total: Duration::from_micros(9_000),
        rules: Duration::from_micros(4_000),
        resolver: Duration::from_micros(3_000),
        configure: Duration::from_micros(8_000),
    };
    let with_net = crate::api::Timing { net: Some(net), ..t };
    let parsed = crate::api::Timing::parse_header(&with_net.header_value());
    assert_eq!(
        (parsed["net"], parsed["net-rules"], parsed["net-dns"], parsed["net-guest"]),
        (9.0, 4.0, 3.0, 8.0)
    );
}
