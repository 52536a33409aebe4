//! Test harness shared by the integration tests (being built).
