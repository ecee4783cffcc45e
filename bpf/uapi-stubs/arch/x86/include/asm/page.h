/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Stands in for the kernel-internal asm/page.h: bcc's helpers.h sizes its
 * ring buffer macros in pages. x86-64 pages are 4 KiB.
 */
#ifndef PAGE_SIZE
#define PAGE_SIZE 4096
#endif
