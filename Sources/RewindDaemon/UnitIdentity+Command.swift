import RewindCore
import RewindLink

extension UnitIdentity {
    /// The unit's identity in `home` (or the default home) for a one-shot command against a
    /// peer (`verify --peer`, `resync`): never created here; its absence is the user's error.
    static func forCommand(home: String?) throws -> UnitIdentity {
        do { return try UnitIdentity.load(home: UnitIdentity.homeDirectory(home)) } catch let e as IdentityError {
            throw RewindError.invalidArgument(e.description)
        }
    }
}
