/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Kernel feature fallbacks. The loader probes the running kernel
 * (dataplane/features.py) and passes -DENABLE_X for each optional feature
 * it has; the stubs below keep call sites free of #ifdef.
 */
#ifndef __KVR_COMPAT_H
#define __KVR_COMPAT_H

/*
 * kvr_set_retval() - the errno a rejecting cgroup program hands the caller
 * (connect(), setsockopt()). bpf_set_retval() arrived in Linux 5.18; before
 * it a rejected call always fails with EPERM, so the stub does nothing and
 * callers of older kernels see EPERM.
 */
#ifdef ENABLE_SET_RETVAL
#define kvr_set_retval(err)	bpf_set_retval(err)
#else
#define kvr_set_retval(err)	((void)(err))
#endif /* ENABLE_SET_RETVAL */

#endif /* __KVR_COMPAT_H */
