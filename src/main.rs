//! The `kling-relay` binary; the command line lives in `kling_relay::cli`.

fn main() -> std::process::ExitCode {
    kling_relay::cli::main()
}
