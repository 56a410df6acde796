//! `wrenn template check`: a recipe checked locally, without a server or a key.

use std::process::Command;

use crate::support::{wrenn_bin, TempDir};

fn check(text: &str) -> (i32, String, String) {
    let d = TempDir::new("recipe");
    let f = d.path().join("Wrennfile");
    std::fs::write(&f, text).unwrap();
    let o = Command::new(wrenn_bin())
        .args(["template", "check"])
        .arg(&f)
        .env_remove("WRENN_API_KEY")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).replace(&*f.to_string_lossy(), "Wrennfile");
    (
        o.status.code().unwrap(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        err,
    )
}

#[test]
fn template_check_lists_steps_or_names_line_and_column() {
    let (code, out, _) = check(
        "FROM minimal\nENV PORT=8080\nUSER app\nWORKDIR /srv\nRUN --timeout=5m make \\\n  install\nSTART ./srv\nHEALTHCHECK curl -f localhost:8080\n",
    );
    assert_eq!(code, 0);
    assert_eq!(
        out,
        "from minimal\n  1. line 2: ENV PORT\n  2. line 3: USER app\n  3. line 4: WORKDIR /srv\n  4. line 5: RUN make    install\nstart (line 7): ./srv\nhealthcheck (line 8): curl -f localhost:8080\n"
    );
    let (code, out, err) = check("RUN true\n\nHEALTHCHECK --retries=zero x\n");
    assert_eq!(code, 1);
    assert!(out.is_empty());
    assert_eq!(err, "Wrennfile:3:13: --retries: \"zero\" is not 1 to 100\n");
}
