//! Compiles the C programs in `bpf/` into BPF objects in OUT_DIR, when the `bpf`
//! feature is on. The compiler is $CLANG, else clang-19, else clang; a missing one is
//! an error that names the package to install.

use std::path::PathBuf;
use std::process::Command;

const PROGRAMS: &[&str] = &["sock_lb", "port_lb"];

fn main() {
    println!("cargo::rerun-if-changed=bpf");
    println!("cargo::rerun-if-env-changed=CLANG");
    if std::env::var_os("CARGO_FEATURE_BPF").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let clang = compiler();
    // UAPI headers include <asm/types.h>, which lives under the multiarch directory.
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let multiarch = format!("-I/usr/include/{arch}-linux-gnu");
    for name in PROGRAMS {
        let source = format!("bpf/{name}.bpf.c");
        let object = out.join(format!("{name}.bpf.o"));
        let result = Command::new(&clang)
            .args([
                "-target", "bpf", "-O2", "-g", "-mcpu=v3", "-Wall", "-Werror",
            ])
            .arg(&multiarch)
            .args(["-c", &source, "-o"])
            .arg(&object)
            .output();
        match result {
            Ok(o) if o.status.success() => {}
            Ok(o) => panic!(
                "{clang} could not compile {source}:\n{}",
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => panic!("cannot run {clang} for {source}: {e}"),
        }
    }
}

fn compiler() -> String {
    if let Ok(c) = std::env::var("CLANG") {
        return c;
    }
    for c in ["clang-19", "clang"] {
        if Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return c.to_string();
        }
    }
    panic!(
        "the `bpf` feature compiles C programs with clang, and neither clang-19 nor clang was found: \
         apt-get install clang-19 libbpf-dev linux-libc-dev (or set CLANG)"
    );
}
