//! The `b24eventd` binary: everything happens in [`b24eventd::cli::main`].

fn main() -> std::process::ExitCode {
    b24eventd::cli::main()
}
