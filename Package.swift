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
    ],
    targets: [
        .systemLibrary(name: "CLMDB", path: "Sources/CLMDB",
                       providers: [.apt(["liblmdb-dev"])]),
        .systemLibrary(name: "CXXHash", path: "Sources/CXXHash",
                       providers: [.apt(["libxxhash-dev"])]),
        .systemLibrary(name: "CLinux", path: "Sources/CLinux"),
        .target(name: "RewindCore", dependencies: ["CLMDB", "CXXHash", "CLinux"]),
        .executableTarget(name: "rewind", dependencies: [
            "RewindCore",
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
    ]
)
