//! wrenn-agent: parses flags and runs the daemon (see the `agent` library).

fn main() {
    let flags =
        match agent::flags::Flags::parse(std::env::args().skip(1), |k| std::env::var(k).ok()) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("wrenn-agent: {e}\n{}", agent::flags::USAGE);
                std::process::exit(2);
            }
        };
    if flags.help {
        println!("{}", agent::flags::USAGE);
        return;
    }
    proto::logger::init();
    if let Err(e) = agent::daemon::run(flags) {
        log::error!("wrenn-agent failed: {e}");
        std::process::exit(1);
    }
}
