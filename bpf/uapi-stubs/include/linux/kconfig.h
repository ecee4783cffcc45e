/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Stands in for the kernel's include/linux/kconfig.h, which bcc force-includes
 * (-include ./include/linux/kconfig.h) from its kernel header directory. The
 * only option bcc's helpers.h checks is CONFIG_BPF_SYSCALL; the probe in
 * dataplane/features.py is what tells whether the running kernel can load BPF.
 */
#define CONFIG_BPF_SYSCALL 1
