//! Helpers shared by the end-to-end tests in `tests/tests/`: where the engine binaries
//! are, generating models, starting llama-server and talking to it.
