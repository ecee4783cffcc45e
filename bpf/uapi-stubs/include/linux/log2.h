/* SPDX-License-Identifier: Apache-2.0 */
/* bcc's helpers.h includes linux/log2.h but uses nothing of it in the kvroute programs. */
