// swift-tools-version:6.1
import PackageDescription

let package = Package(
    name: "rewind",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "rewind", targets: ["rewind"]),
        .library(name: "RewindCore", targets: ["RewindCore"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
        .package(url: "https://github.com/LebJe/TOMLKit", from: "0.6.0"),
        // A unit's key pair and self-signed certificate (`rewind id`), for the link's mutual TLS.
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
        .package(url: "https://github.com/apple/swift-certificates", from: "1.21.1"),
        // The link's mutual TLS 1.3 (peers pinned by the SHA-256 of their public keys).
        .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.37.6"),
    ],
    targets: [
        .systemLibrary(name: "CLMDB", path: "Sources/CLMDB",
                       providers: [.apt(["liblmdb-dev"])]),
        .systemLibrary(name: "CXXHash", path: "Sources/CXXHash",
                       providers: [.apt(["libxxhash-dev"])]),
        .systemLibrary(name: "CLinux", path: "Sources/CLinux"),
        // LMDB's read calls under a SIGBUS/SIGSEGV guard (a damaged data.mdb is an error, not a crash).
        .target(name: "CLMDBGuard", dependencies: ["CLMDB"]),
        .target(name: "RewindCore", dependencies: ["CLMDB", "CLMDBGuard", "CXXHash", "CLinux"]),
        .target(name: "RewindNBD", dependencies: [
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // The replication link: frames and messages (docs/formats.md), mutual TLS, sender, receiver.
        .target(name: "RewindLink", dependencies: [
            "RewindCore",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
            .product(name: "NIOTLS", package: "swift-nio"),
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "X509", package: "swift-certificates"),
        ]),
        .testTarget(name: "RewindLinkTests", dependencies: [
            "RewindLink", "RewindCore",
            .product(name: "Logging", package: "swift-log"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "X509", package: "swift-certificates"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOEmbedded", package: "swift-nio"),
            .product(name: "NIOTestUtils", package: "swift-nio"),
        ]),
        .target(name: "RewindDaemon", dependencies: [
            "RewindCore", "RewindNBD", "RewindLink",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Metrics", package: "swift-metrics"),
            .product(name: "Prometheus", package: "swift-prometheus"),
            .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            // The serve config file's TOML (toml++ underneath).
            .product(name: "TOMLKit", package: "TOMLKit"),
        ]),
        .executableTarget(name: "rewind", dependencies: [
            "RewindCore", "RewindDaemon", "RewindLink",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        // Test helper: a deterministic append/compact workload that crash tests SIGKILL.
        // Deterministic workloads shared by tests, the crash-test child and benchmarks.
        .target(name: "RewindWorkload", dependencies: ["RewindCore"]),
        .executableTarget(name: "rewind-torture", dependencies: ["RewindCore", "RewindWorkload"]),
        // Benchmarks: rewind beside plain-file peers in one run (benchmarks/README.md).
        .executableTarget(name: "rewind-bench", dependencies: ["RewindCore", "RewindWorkload"],
                          path: "benchmarks/RewindBench"),
        .testTarget(name: "RewindCoreTests", dependencies: ["RewindCore", "RewindWorkload"]),
        // libFuzzer target over the whole NBD connection state machine; built only by
        // scripts/fuzz.sh with -sanitize=fuzzer (no main: libFuzzer provides it).
        .executableTarget(name: "rewind-fuzz-nbd", dependencies: [
            "RewindNBD",
            .product(name: "NIOEmbedded", package: "swift-nio"),
        ], path: "Tests/Fuzz/NBDFuzz", swiftSettings: [.unsafeFlags(["-parse-as-library"])]),
        .testTarget(name: "RewindNBDTests", dependencies: [
            "RewindNBD",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOEmbedded", package: "swift-nio"),
            .product(name: "NIOTestUtils", package: "swift-nio"),
        ]),
    ]
)
