"""The three phases of MTL, one module each: pretrain, meta_train, meta_test."""
