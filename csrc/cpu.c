/*
 * CPU feature detection and the raw PKRU register.
 */
#include "pkeys_internal.h"

#if PK_X86
#include <cpuid.h>
#endif

/* The simulated-register build reads as PKU with OSPKE on, so that the
 * hardware backend's code runs; its instructions touch a variable. */
int pk_ospke_enabled = PK_SIMULATED_PKU;
static int pku_present = PK_SIMULATED_PKU;
#if PK_SIMULATED_PKU
PK_TLS volatile uint32_t pk_simulated_pkru =
    0x55555554u;
#endif

/* Leaf 7 exists only when the maximum basic leaf reaches it; asking a CPU
 * for an unsupported leaf returns the highest leaf's data, not zeros. */
static unsigned int cpuid7_ecx(void)
{
#if PK_X86
    unsigned int eax, ebx, ecx, edx;
    if (__get_cpuid_max(0, NULL) < 7)
        return 0;
    __cpuid_count(7, 0, eax, ebx, ecx, edx);
    (void)eax, (void)ebx, (void)edx;
    return ecx;
#else
    return 0;
#endif
}

__attribute__((constructor)) static void pk_detect_cpu(void)
{
    unsigned int ecx;
    if (PK_SIMULATED_PKU)
        return;
    ecx = cpuid7_ecx();
    pku_present = (ecx >> 3) & 1;
    pk_ospke_enabled = (ecx >> 4) & 1;
}

int pk_cpu_has_pku(void) { return pku_present; }
int pk_cpu_has_ospke(void) { return pk_ospke_enabled; }
int pk_arch_is_x86(void) { return PK_X86; }
int pk_build_simulated(void) { return PK_SIMULATED_PKU; }

int64_t pk_rdpkru(void)
{
    if (!pk_ospke_enabled)
        return -1;
    return pk_rdpkru_unchecked();
}

int pk_wrpkru(uint32_t value)
{
    if (!pk_ospke_enabled)
        return -1;
    pk_wrpkru_unchecked(value);
    return 0;
}
