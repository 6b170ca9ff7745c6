//! Placeholder entry point; the guest agent itself is being built (issue 3).
fn main() {
    eprintln!("hangar-guest: not built yet");
    std::process::exit(1);
}
