#![no_std]
// This file exists to enable the library target, so that mtlb-userspace can
// list mtlb-ebpf as a build dependency and be rebuilt when it changes.
