import Logging
import Metrics
import Prometheus
import RewindCore
import RewindNBD

/// What `serve` and `export` set up alike before they open anything.
enum DaemonSupport {
    /// Log to stderr at `level` (`--log-level`; info when unknown).
    static func bootstrapLogging(level: String) {
        let level = Logger.Level(rawValue: level) ?? .info
        LoggingSystem.bootstrap { label in
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = level
            return h
        }
    }

    /// With `wanted` (`--metrics`), route swift-metrics to a Prometheus registry, returned
    /// for the metrics server; nil otherwise (metrics then go nowhere).
    static func bootstrapMetrics(_ wanted: Bool) -> PrometheusCollectorRegistry? {
        guard wanted else { return nil }
        let registry = PrometheusCollectorRegistry()
        MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: registry))
        return registry
    }

    /// The addresses to listen on (`127.0.0.1:10809` when none is given). A Unix socket path a
    /// live server answers on is refused here, before anything is created or opened (`start`
    /// checks again when it binds).
    static func listenAddresses(_ given: [ListenAddress]) throws -> [ListenAddress] {
        let addresses = given.isEmpty ? [ListenAddress.tcp(host: "127.0.0.1", port: NBD.defaultPort)] : given
        do {
            try NBDServer.checkUnixSocketPaths(addresses)
        } catch let e as ListenError {
            throw RewindError.invalidArgument(e.description)
        }
        return addresses
    }
}
