/* SPDX-License-Identifier: Apache-2.0 */
/*
 * bcc compiles with its own copy of the BPF UAPI (the one its helper
 * declarations match) and includes it before anything else; the
 * headers_install copy in linux-libc-dev carries another include guard and
 * would clash with it. Naming bcc's copy here keeps the two from meeting.
 */
#include <bcc/bpf.h>
