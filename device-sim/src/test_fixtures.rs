//! Fixtures shared by the unit tests of several modules.

use vitalmq_policies::DeviceRegistry;

/// A registry (trust domain `demo.vitalmq`) of devices 1..=`devices`, device n
/// registered at site `(n - 1) % sites + 1`.
pub fn registry_of(devices: u32, sites: u32) -> DeviceRegistry {
    let mut registry = DeviceRegistry::new(
        vitalmq_policies::TrustDomain::new("demo.vitalmq").expect("trust domain"),
    );
    for n in 1..=devices {
        let (_, entry) = vitalmq_certs::enroll_device(
            vitalmq_certs::device_id(n),
            vitalmq_certs::site_id((n - 1) % sites + 1),
            vitalmq_envelope::Algorithm::EdDsa,
        )
        .expect("enroll");
        registry.insert_device(entry).expect("new device");
    }
    registry
}
