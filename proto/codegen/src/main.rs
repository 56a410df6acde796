//! `cargo run -p proto-codegen` regenerates `proto/src/gen/` from `proto/schema/`;
//! `cargo run -p proto-codegen -- --check` fails when the checked-in code is stale.
//!
//! Besides prost's messages, every service gets a module of method-name constants and a
//! table of [`MethodDesc`](proto::rpc::MethodDesc)s, so no method string is typed by hand;
//! a `<Service>Server` trait with one method per RPC, each given the call's
//! `proto::rpc::CallCtx` (the caller), and `dispatch_<service>`, which routes a call to it
//! through `proto::rpc::serve`, and `call_unary_<service>` (the same for unary calls with
//! encoded messages, for transports without a stream); and a `<Service>Client` with one
//! typed call per RPC. Every package with servers also gets `PackageServer` (all its server
//! traits), `dispatch_package` and `call_unary_package`.
//!
//! It also writes `ctl/src/http/gen_json.rs`: the HTTP gateway's JSON mapping of every message
//! of `wrenn.ctl.v1` (and the packages it imports) and their OpenAPI component schemas (see
//! `json.rs`). `--check` covers that file too.

#![forbid(unsafe_code)]

mod forward;
mod json;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The service generator; `forwarded` holds the methods with `(wrenn.forward)`, which the
/// server traits leave out (the generic forwarding path serves them).
struct Methods {
    forwarded: std::collections::BTreeSet<String>,
    /// The `<service>_methods` modules of the package being generated.
    modules: Vec<String>,
    /// The services of the package being generated that have a server trait: (service
    /// name, snake-case name).
    servers: Vec<(String, String)>,
}

impl prost_build::ServiceGenerator for Methods {
    fn generate(&mut self, service: prost_build::Service, buf: &mut String) {
        let module = format!("{}_methods", snake(&service.name));
        let full = format!("{}.{}", service.package, service.proto_name);
        let _ = writeln!(buf, "/// Method names of service `{full}`.");
        let _ = writeln!(buf, "pub mod {module} {{");
        for m in &service.methods {
            let _ = writeln!(
                buf,
                "    pub const {}: &str = \"{full}/{}\";",
                snake(&m.proto_name).to_uppercase(),
                m.proto_name
            );
        }
        let _ = writeln!(buf, "    /// Every method with its streaming shape.");
        let _ = writeln!(buf, "    pub const ALL: &[crate::rpc::MethodDesc] = &[");
        for m in &service.methods {
            let _ = writeln!(
                buf,
                "        crate::rpc::MethodDesc {{ name: {}, client_streaming: {}, server_streaming: {}, input: \"{}\", output: \"{}\" }},",
                snake(&m.proto_name).to_uppercase(),
                m.client_streaming,
                m.server_streaming,
                m.input_proto_type.trim_start_matches('.'),
                m.output_proto_type.trim_start_matches('.')
            );
        }
        let _ = writeln!(buf, "    ];");
        let _ = writeln!(buf, "}}");
        if server_trait(&service, &module, &full, &self.forwarded, buf) {
            self.servers
                .push((service.name.clone(), snake(&service.name)));
        }
        client_stub(&service, &module, &full, buf);
        self.modules.push(module);
    }

    /// Called after each `.proto` file (every package is one file): every method of the
    /// package, service by service, which tables naming methods are checked against.
    fn finalize(&mut self, buf: &mut String) {
        if self.modules.is_empty() {
            return;
        }
        let _ = writeln!(buf, "/// Every method of every service of this package.");
        let _ = writeln!(buf, "pub const METHODS: &[&[crate::rpc::MethodDesc]] = &[");
        for m in self.modules.drain(..) {
            let _ = writeln!(buf, "    {m}::ALL,");
        }
        let _ = writeln!(buf, "];");
        package_server(&std::mem::take(&mut self.servers), buf);
    }
}

/// The shape of a method: which adaptor of `proto::rpc::serve` runs it.
fn shape(m: &prost_build::Method) -> &'static str {
    match (m.client_streaming, m.server_streaming) {
        (false, false) => "unary",
        (false, true) => "server streaming",
        (true, false) => "client streaming",
        (true, true) => "bidirectional",
    }
}

/// `trait PackageServer`, implemented by whatever implements every server trait of the
/// package, and `dispatch_package`, which tries each service's dispatch in turn. A server
/// that routes through it gets a compile error when the package gains a service.
fn package_server(servers: &[(String, String)], buf: &mut String) {
    if servers.is_empty() {
        return;
    }
    let bounds: Vec<String> = servers.iter().map(|(n, _)| format!("{n}Server")).collect();
    let bounds = bounds.join(" + ");
    let _ = writeln!(
        buf,
        "/// Every server trait of this package: a type implementing them all serves the\n\
         /// package through [`dispatch_package`]."
    );
    let _ = writeln!(buf, "pub trait PackageServer: {bounds} {{}}");
    let _ = writeln!(buf, "impl<T: {bounds} + ?Sized> PackageServer for T {{}}");
    let _ = writeln!(
        buf,
        "/// Runs a call of any service of this package on `svc` and returns its final code, or\n\
         /// gives the stream back when no service of the package has the method (a forwarded\n\
         /// method, or one of another package)."
    );
    let _ = writeln!(
        buf,
        "pub fn dispatch_package<S: PackageServer + ?Sized>(svc: &S, stream: crate::rpc::ServerStream) -> Result<crate::Code, crate::rpc::ServerStream> {{"
    );
    for (_, snake_name) in servers {
        let _ = writeln!(
            buf,
            "    let stream = match dispatch_{snake_name}(svc, stream) {{ Ok(code) => return Ok(code), Err(s) => s }};"
        );
    }
    let _ = writeln!(buf, "    Err(stream)");
    let _ = writeln!(buf, "}}");
    let _ = writeln!(
        buf,
        "/// Runs a unary method of any service of this package on `svc` with its encoded\n\
         /// request (see each service's `call_unary_<service>`); None when no service of the\n\
         /// package has it as a unary method."
    );
    let _ = writeln!(
        buf,
        "pub fn call_unary_package<S: PackageServer + ?Sized>(svc: &S, ctx: &crate::rpc::CallCtx, method: &str, req: &[u8]) -> Option<Result<Vec<u8>, crate::Status>> {{"
    );
    let calls: Vec<String> = servers
        .iter()
        .map(|(_, snake_name)| format!("call_unary_{snake_name}(svc, ctx, method, req)"))
        .collect();
    let mut chain = calls[0].clone();
    for c in &calls[1..] {
        let _ = write!(chain, ".or_else(|| {c})");
    }
    let _ = writeln!(buf, "    {chain}");
    let _ = writeln!(buf, "}}");
}

/// `trait <Service>Server`, one method per RPC, and `dispatch_<service>`, which routes a
/// call (already on a worker thread) to it. A new RPC in the `.proto` file is then one more
/// trait method, and the compiler names every server that must implement it. Every method
/// gets the call's [`CallCtx`](proto::rpc::CallCtx): who called (the principal the hello
/// decided), from where, with which client certificate. Returns whether a trait was written.
fn server_trait(
    service: &prost_build::Service,
    module: &str,
    full: &str,
    forwarded: &std::collections::BTreeSet<String>,
    buf: &mut String,
) -> bool {
    let name = &service.name;
    let served: Vec<&prost_build::Method> = service
        .methods
        .iter()
        .filter(|m| !forwarded.contains(&format!("{full}/{}", m.proto_name)))
        .collect();
    if served.is_empty() {
        // Every method is forwarded: there is nothing for a server to implement.
        return false;
    }
    let snake_name = snake(name);
    let _ = writeln!(
        buf,
        "/// Server side of `{full}`: one method per RPC. Handlers run on the server's worker\n\
         /// threads and may block; [`dispatch_{snake_name}`] routes calls to them."
    );
    if served.len() < service.methods.len() {
        let _ = writeln!(
            buf,
            "/// Methods with the `(wrenn.forward)` option are not here: they are forwarded to\n\
             /// envd through `proto::rpc::forward` (PROTOCOL.md §9)."
        );
    }
    let _ = writeln!(buf, "pub trait {name}Server: Send + Sync {{");
    for m in &served {
        let (i, o) = (&m.input_type, &m.output_type);
        let _ = writeln!(buf, "    /// `{}` ({}).", m.proto_name, shape(m));
        let sig = match (m.client_streaming, m.server_streaming) {
            (false, false) => format!(
                "fn {}(&self, ctx: &crate::rpc::CallCtx, req: {i}) -> Result<{o}, crate::Status>;",
                m.name
            ),
            (true, false) => format!(
                "fn {}(&self, ctx: &crate::rpc::CallCtx, req: {i}, stream: &mut crate::rpc::ServerStream) -> Result<{o}, crate::Status>;",
                m.name
            ),
            _ => format!(
                "fn {}(&self, ctx: &crate::rpc::CallCtx, req: {i}, stream: &mut crate::rpc::ServerStream) -> Result<(), crate::Status>;",
                m.name
            ),
        };
        let _ = writeln!(buf, "    {sig}");
    }
    let _ = writeln!(buf, "}}");
    let _ = writeln!(
        buf,
        "/// Runs a call of `{full}` on `svc` and returns its final code, or gives the stream\n\
         /// back when the method is not one of this service's."
    );
    let _ = writeln!(
        buf,
        "pub fn dispatch_{snake_name}<S: {name}Server + ?Sized>(svc: &S, stream: crate::rpc::ServerStream) -> Result<crate::Code, crate::rpc::ServerStream> {{"
    );
    let _ = writeln!(buf, "    let code = match stream.method() {{");
    for m in &served {
        let adaptor = match (m.client_streaming, m.server_streaming) {
            (false, false) => "unary(stream, |p, r| svc.NAME(p, r))",
            (true, false) => "client_streaming(stream, |p, r, s| svc.NAME(p, r, s))",
            _ => "streaming(stream, |p, r, s| svc.NAME(p, r, s))",
        }
        .replace("NAME", &m.name);
        let _ = writeln!(
            buf,
            "        {module}::{} => crate::rpc::serve::{adaptor},",
            snake(&m.proto_name).to_uppercase()
        );
    }
    let _ = writeln!(buf, "        _ => return Err(stream),");
    let _ = writeln!(buf, "    }};");
    let _ = writeln!(buf, "    Ok(code)");
    let _ = writeln!(buf, "}}");
    let _ = writeln!(
        buf,
        "/// Runs a unary method of `{full}` on `svc` with its encoded request and returns the\n\
         /// encoded response (for transports without a `ServerStream`: ctl's HTTP gateway);\n\
         /// None when `method` is not a unary method of this service."
    );
    let _ = writeln!(
        buf,
        "pub fn call_unary_{snake_name}<S: {name}Server + ?Sized>(svc: &S, ctx: &crate::rpc::CallCtx, method: &str, req: &[u8]) -> Option<Result<Vec<u8>, crate::Status>> {{"
    );
    let unary: Vec<&&prost_build::Method> = served
        .iter()
        .filter(|m| !m.client_streaming && !m.server_streaming)
        .collect();
    if unary.is_empty() {
        let _ = writeln!(buf, "    let _ = (svc, ctx, method, req);");
        let _ = writeln!(buf, "    None");
        let _ = writeln!(buf, "}}");
        return true;
    }
    let _ = writeln!(buf, "    let r = match method {{");
    for m in unary {
        let _ = writeln!(
            buf,
            "        {module}::{c} => crate::rpc::serve::unary_bytes(ctx, {module}::{c}, req, |c, r| svc.{n}(c, r)),",
            c = snake(&m.proto_name).to_uppercase(),
            n = m.name
        );
    }
    let _ = writeln!(buf, "        _ => return None,");
    let _ = writeln!(buf, "    }};");
    let _ = writeln!(buf, "    Some(r)");
    let _ = writeln!(buf, "}}");
    true
}

/// `struct <Service>Client`: a typed call per RPC over a `proto::rpc::Client`. Unary calls
/// return the response; the others return the open stream (the request is its first
/// message).
fn client_stub(service: &prost_build::Service, module: &str, full: &str, buf: &mut String) {
    let name = &service.name;
    let _ = writeln!(
        buf,
        "/// Typed calls of `{full}` over a connection; `timeout` is each call's deadline."
    );
    let _ = writeln!(buf, "#[derive(Clone, Copy, Debug)]");
    let _ = writeln!(
        buf,
        "pub struct {name}Client<'a> {{ pub client: &'a crate::rpc::Client, pub timeout: Option<std::time::Duration> }}"
    );
    let _ = writeln!(buf, "impl<'a> {name}Client<'a> {{");
    let _ = writeln!(
        buf,
        "    pub fn new(client: &'a crate::rpc::Client) -> Self {{ {name}Client {{ client, timeout: None }} }}"
    );
    let _ = writeln!(
        buf,
        "    pub fn with_timeout(self, timeout: std::time::Duration) -> Self {{ {name}Client {{ timeout: Some(timeout), ..self }} }}"
    );
    for m in &service.methods {
        let (i, o) = (&m.input_type, &m.output_type);
        let method = format!("{module}::{}", snake(&m.proto_name).to_uppercase());
        let _ = writeln!(buf, "    /// `{}` ({}).", m.proto_name, shape(m));
        if !m.client_streaming && !m.server_streaming {
            let _ = writeln!(
                buf,
                "    pub fn {}(&self, req: &{i}) -> Result<{o}, crate::Status> {{ self.client.unary({method}, req, self.timeout) }}",
                m.name
            );
        } else {
            let _ = writeln!(
                buf,
                "    pub fn {}(&self, req: &{i}) -> Result<crate::rpc::ClientStream, crate::Status> {{ self.client.call({method}, req, crate::rpc::CallOpts {{ timeout: self.timeout, end_stream: {} }}) }}",
                m.name, !m.client_streaming
            );
        }
    }
    let _ = writeln!(buf, "}}");
}

fn snake(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

fn proto_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            proto_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
    Ok(())
}

fn generate(schema: &Path, out_dir: &Path) -> Result<(String, String), String> {
    let mut files = Vec::new();
    proto_files(schema, &mut files).map_err(|e| format!("read {}: {e}", schema.display()))?;
    files.sort();
    let mut compiler =
        protox::Compiler::new([schema]).map_err(|e| format!("compile schema: {e}"))?;
    compiler.include_imports(true).include_source_info(true);
    compiler
        .open_files(&files)
        .map_err(|e| format!("compile schema: {e}"))?;
    let pool = compiler.descriptor_pool();
    let forward_text = forward::generate(&pool)?;
    let forwarded = forward::forwarded(&pool);
    let mut fds = compiler.file_descriptor_set();
    let json_text = json::generate(fds.clone(), json::Target::Gateway)?;
    let cli_text = json::generate(fds.clone(), json::Target::Cli)?;
    // descriptor.proto (imported for the options' `extend`) is prost-types' business.
    fds.file
        .retain(|f| f.package.as_deref() != Some("google.protobuf"));
    let mut packages: Vec<String> = fds.file.iter().filter_map(|f| f.package.clone()).collect();
    packages.sort();
    packages.dedup();
    let mut config = prost_build::Config::new();
    config.out_dir(out_dir);
    config.service_generator(Box::new(Methods {
        forwarded,
        modules: Vec::new(),
        servers: Vec::new(),
    }));
    config.bytes(["."]);
    config
        .compile_fds(fds)
        .map_err(|e| format!("generate: {e}"))?;
    // prost writes one file per package; mod.rs nests them as `wrenn::envd::v1`.
    let mut tree: std::collections::BTreeMap<Vec<String>, String> = Default::default();
    for p in &packages {
        tree.insert(p.split('.').map(str::to_owned).collect(), p.clone());
    }
    let mut m = String::from(
        "// @generated by proto-codegen from proto/schema. Do not edit; run\n\
         // `cargo run -p proto-codegen` after changing a .proto file.\n\
         #![allow(clippy::all, missing_docs, rustdoc::all)]\n\n",
    );
    write_tree(&mut m, &tree, &[], 0);
    m.push_str("/// The forwarding table (PROTOCOL.md §9).\npub mod forward {\n    include!(\"forward.rs\");\n}\n");
    std::fs::write(out_dir.join("mod.rs"), m).map_err(|e| format!("write mod.rs: {e}"))?;
    std::fs::write(out_dir.join("forward.rs"), forward_text)
        .map_err(|e| format!("write forward.rs: {e}"))?;
    Ok((json_text, cli_text))
}

fn write_tree(
    out: &mut String,
    tree: &std::collections::BTreeMap<Vec<String>, String>,
    prefix: &[String],
    depth: usize,
) {
    let mut children: Vec<&String> = tree
        .keys()
        .filter(|k| k.len() > prefix.len() && k[..prefix.len()] == *prefix)
        .map(|k| &k[prefix.len()])
        .collect();
    children.dedup();
    let pad = "    ".repeat(depth);
    for child in children {
        let mut path = prefix.to_vec();
        path.push(child.clone());
        let _ = writeln!(out, "{pad}pub mod {child} {{");
        if let Some(pkg) = tree.get(&path) {
            let _ = writeln!(out, "{pad}    include!(\"{pkg}.rs\");");
        }
        write_tree(out, tree, &path, depth + 1);
        let _ = writeln!(out, "{pad}}}");
    }
}

fn main() -> ExitCode {
    let check = std::env::args().any(|a| a == "--check");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let schema = root.join("schema");
    let gen = root.join("src/gen");
    let json_path = root.join("../ctl/src/http/gen_json.rs");
    let cli_path = root.join("../cli/src/cli/gen_json.rs");
    let target = if check {
        let tmp = std::env::temp_dir().join(format!("wrenn-codegen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        if let Err(e) = std::fs::create_dir_all(&tmp) {
            eprintln!("error: create {}: {e}", tmp.display());
            return ExitCode::FAILURE;
        }
        tmp
    } else {
        let _ = std::fs::remove_dir_all(&gen);
        if let Err(e) = std::fs::create_dir_all(&gen) {
            eprintln!("error: create {}: {e}", gen.display());
            return ExitCode::FAILURE;
        }
        gen.clone()
    };
    let (json_text, cli_text) = match generate(&schema, &target) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if !check {
        for (path, text) in [(&json_path, &json_text), (&cli_path, &cli_text)] {
            if let Err(e) = std::fs::write(path, text) {
                eprintln!("error: write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        }
        println!(
            "generated {}, {} and {}",
            gen.display(),
            json_path.display(),
            cli_path.display()
        );
        return ExitCode::SUCCESS;
    }
    let same = |path: &Path, text: &str| match std::fs::read_to_string(path) {
        Ok(t) if t == text => Ok(()),
        Ok(_) => Err(format!("{} differs", path.display())),
        Err(e) => Err(format!("read {}: {e}", path.display())),
    };
    let stale = compare(&target, &gen)
        .and_then(|()| same(&json_path, &json_text))
        .and_then(|()| same(&cli_path, &cli_text));
    let _ = std::fs::remove_dir_all(&target);
    match stale {
        Ok(()) => {
            println!("generated code is up to date");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: generated code is stale ({e}); run `cargo run -p proto-codegen`");
            ExitCode::FAILURE
        }
    }
}

fn compare(fresh: &Path, checked_in: &Path) -> Result<(), String> {
    let list = |d: &Path| -> Result<Vec<String>, String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .map_err(|e| format!("read {}: {e}", d.display()))?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        v.sort();
        Ok(v)
    };
    let a = list(fresh)?;
    let b = list(checked_in)?;
    if a != b {
        return Err(format!("files differ: {a:?} vs {b:?}"));
    }
    for name in a {
        let x = std::fs::read(fresh.join(&name)).map_err(|e| e.to_string())?;
        let y = std::fs::read(checked_in.join(&name)).map_err(|e| e.to_string())?;
        if x != y {
            return Err(format!("{name} differs"));
        }
    }
    Ok(())
}
