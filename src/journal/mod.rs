//! The journal (being written)
