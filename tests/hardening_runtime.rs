//! Hardening, second round (issue 28): the ONNX Runtime library, cache merges and extraction locks.
