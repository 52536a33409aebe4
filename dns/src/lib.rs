//! meshup-dns (being built).
