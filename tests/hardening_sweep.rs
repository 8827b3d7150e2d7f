//! Hardening, second round (issue 28): grid expansion, predict outputs and messages.
