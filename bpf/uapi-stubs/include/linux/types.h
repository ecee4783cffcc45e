/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Stands in for the kernel-internal linux/types.h: the UAPI types plus the
 * short names (u32, bool, size_t, NULL) bcc's helpers.h and the programs
 * use, which only the kernel-internal header defines.
 */
#ifndef __KVR_STUB_LINUX_TYPES_H
#define __KVR_STUB_LINUX_TYPES_H

#include <uapi/linux/types.h>

typedef __u8 u8;
typedef __s8 s8;
typedef __u16 u16;
typedef __s16 s16;
typedef __u32 u32;
typedef __s32 s32;
typedef __u64 u64;
typedef __s64 s64;
typedef __kernel_size_t size_t;
typedef unsigned long uintptr_t;
typedef _Bool bool;

enum {
	false = 0,
	true = 1
};

#define NULL ((void *)0)

#endif /* __KVR_STUB_LINUX_TYPES_H */
