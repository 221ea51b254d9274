//! Tells the tests what the building machine's CPU has, so that a kernel test for an
//! instruction set it lacks shows in the harness as ignored, with the reason, instead of
//! passing without running: `itt_amx` (AMX-BF16 + AMX-TILE beside AVX-512F/BW, what
//! `ops::fused::bf16_gemm::amx_available` asks of the CPU), `itt_avx512` (AVX-512F/BW) and
//! `itt_avx512bf16` (AVX-512F/BW + AVX512_BF16, the `vdpbf16ps` kernel's needs) and
//! `itt_avx512vnni` (AVX-512F/BW/VL + AVX512_VNNI, the quantized `vpdpbusd` kernels').
//! The library itself decides at run time and never reads these.

fn main() {
    println!("cargo:rustc-check-cfg=cfg(itt_amx)");
    println!("cargo:rustc-check-cfg=cfg(itt_avx512)");
    println!("cargo:rustc-check-cfg=cfg(itt_avx512bf16)");
    println!("cargo:rustc-check-cfg=cfg(itt_avx512vnni)");
    println!("cargo:rerun-if-changed=build.rs");
    // Only when the tests will run on this kind of machine (not when cross-compiling).
    let native = std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok(std::env::consts::ARCH);
    #[cfg(target_arch = "x86_64")]
    if native {
        let avx512 = std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw");
        if avx512 {
            println!("cargo:rustc-cfg=itt_avx512");
            if std::arch::is_x86_feature_detected!("avx512bf16") {
                println!("cargo:rustc-cfg=itt_avx512bf16");
            }
            if std::arch::is_x86_feature_detected!("avx512vl") && std::arch::is_x86_feature_detected!("avx512vnni") {
                println!("cargo:rustc-cfg=itt_avx512vnni");
            }
            // CPUID leaf 7, EDX bits 22 (AMX-BF16) and 24 (AMX-TILE).
            let max_leaf = std::arch::x86_64::__cpuid_count(0, 0).eax;
            let edx = if max_leaf >= 7 { std::arch::x86_64::__cpuid_count(7, 0).edx } else { 0 };
            if edx & (1 << 22) != 0 && edx & (1 << 24) != 0 {
                println!("cargo:rustc-cfg=itt_amx");
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = native;
}
