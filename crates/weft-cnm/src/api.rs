//! The legacy (v1) Docker plugin API as libnetwork's remote driver and remote IPAM speak it:
//! request and response bodies (JSON, Go's field names). Requests are parsed leniently
//! (unknown fields ignored, missing ones empty), as libnetwork sends what its version knows.

use serde::{Deserialize, Deserializer, Serialize};
use std::collections::HashMap;

/// Go marshals empty maps and slices as `null`: read it as empty.
fn null_default<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(
    d: D,
) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// libnetwork's label for the driver options of `docker network create -o k=v`.
pub const GENERIC_OPTIONS: &str = "com.docker.network.generic";
/// RequestAddress's option asking for the network's gateway, and RequestPool's data key
/// giving it.
pub const GATEWAY: &str = "com.docker.network.gateway";
pub const REQUEST_ADDRESS_TYPE: &str = "RequestAddressType";

#[derive(Serialize)]
pub struct ActivateResponse {
    #[serde(rename = "Implements")]
    pub implements: Vec<&'static str>,
}

#[derive(Serialize)]
pub struct Capabilities {
    #[serde(rename = "Scope")]
    pub scope: &'static str,
    #[serde(rename = "ConnectivityScope")]
    pub connectivity_scope: &'static str,
}

#[derive(Serialize)]
pub struct IpamCapabilities {
    #[serde(rename = "RequiresMACAddress", deserialize_with = "null_default")]
    pub requires_mac: bool,
    #[serde(rename = "RequiresRequestReplay", deserialize_with = "null_default")]
    pub requires_replay: bool,
}

#[derive(Serialize)]
pub struct AddressSpaces {
    #[serde(rename = "LocalDefaultAddressSpace")]
    pub local: &'static str,
    #[serde(rename = "GlobalDefaultAddressSpace")]
    pub global: &'static str,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default)]
pub struct IpamData {
    #[serde(rename = "AddressSpace", deserialize_with = "null_default")]
    pub address_space: String,
    #[serde(rename = "Pool", deserialize_with = "null_default")]
    pub pool: String,
    #[serde(rename = "Gateway", deserialize_with = "null_default")]
    pub gateway: String,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default)]
pub struct CreateNetwork {
    #[serde(rename = "NetworkID", deserialize_with = "null_default")]
    pub network_id: String,
    #[serde(rename = "Options", deserialize_with = "null_default")]
    pub options: HashMap<String, serde_json::Value>,
    #[serde(rename = "IPv4Data", deserialize_with = "null_default")]
    pub ipv4_data: Vec<IpamData>,
    #[serde(rename = "IPv6Data", deserialize_with = "null_default")]
    pub ipv6_data: Vec<IpamData>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default)]
pub struct NetworkRef {
    #[serde(rename = "NetworkID", deserialize_with = "null_default")]
    pub network_id: String,
}

#[derive(Deserialize, Serialize, Default, Debug, Clone)]
#[serde(default)]
pub struct EndpointInterface {
    #[serde(rename = "Address", skip_serializing_if = "String::is_empty")]
    pub address: String,
    #[serde(rename = "AddressIPv6", skip_serializing_if = "String::is_empty")]
    pub address_ipv6: String,
    #[serde(rename = "MacAddress", skip_serializing_if = "String::is_empty")]
    pub mac_address: String,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default)]
pub struct CreateEndpoint {
    #[serde(rename = "NetworkID", deserialize_with = "null_default")]
    pub network_id: String,
    #[serde(rename = "EndpointID", deserialize_with = "null_default")]
    pub endpoint_id: String,
    #[serde(rename = "Interface")]
    pub interface: Option<EndpointInterface>,
}

/// DeleteEndpoint, EndpointOperInfo, Leave, Program/RevokeExternalConnectivity.
#[derive(Deserialize, Default, Debug)]
#[serde(default)]
pub struct EndpointRef {
    #[serde(rename = "NetworkID", deserialize_with = "null_default")]
    pub network_id: String,
    #[serde(rename = "EndpointID", deserialize_with = "null_default")]
    pub endpoint_id: String,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default)]
pub struct Join {
    #[serde(rename = "NetworkID", deserialize_with = "null_default")]
    pub network_id: String,
    #[serde(rename = "EndpointID", deserialize_with = "null_default")]
    pub endpoint_id: String,
    #[serde(rename = "SandboxKey", deserialize_with = "null_default")]
    pub sandbox_key: String,
}

#[derive(Serialize, Debug)]
pub struct InterfaceName {
    #[serde(rename = "SrcName", deserialize_with = "null_default")]
    pub src_name: String,
    #[serde(rename = "DstPrefix", deserialize_with = "null_default")]
    pub dst_prefix: String,
}

/// RouteType 1: a connected route (no next hop); 0: via NextHop.
#[derive(Serialize, Debug)]
pub struct StaticRoute {
    #[serde(rename = "Destination", deserialize_with = "null_default")]
    pub destination: String,
    #[serde(rename = "RouteType")]
    pub route_type: u8,
    #[serde(rename = "NextHop", skip_serializing_if = "String::is_empty")]
    pub next_hop: String,
}

#[derive(Serialize, Debug)]
pub struct JoinResponse {
    #[serde(rename = "InterfaceName")]
    pub interface_name: InterfaceName,
    #[serde(rename = "Gateway", deserialize_with = "null_default")]
    pub gateway: String,
    #[serde(rename = "StaticRoutes")]
    pub static_routes: Vec<StaticRoute>,
    #[serde(rename = "DisableGatewayService", deserialize_with = "null_default")]
    pub disable_gateway_service: bool,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default)]
pub struct RequestPool {
    #[serde(rename = "AddressSpace", deserialize_with = "null_default")]
    pub address_space: String,
    #[serde(rename = "Pool", deserialize_with = "null_default")]
    pub pool: String,
    #[serde(rename = "SubPool", deserialize_with = "null_default")]
    pub sub_pool: String,
    #[serde(rename = "Options", deserialize_with = "null_default")]
    pub options: HashMap<String, String>,
    #[serde(rename = "V6", deserialize_with = "null_default")]
    pub v6: bool,
}

#[derive(Serialize, Debug)]
pub struct RequestPoolResponse {
    #[serde(rename = "PoolID", deserialize_with = "null_default")]
    pub pool_id: String,
    #[serde(rename = "Pool", deserialize_with = "null_default")]
    pub pool: String,
    #[serde(rename = "Data", deserialize_with = "null_default")]
    pub data: HashMap<String, String>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default)]
pub struct PoolRef {
    #[serde(rename = "PoolID", deserialize_with = "null_default")]
    pub pool_id: String,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default)]
pub struct RequestAddress {
    #[serde(rename = "PoolID", deserialize_with = "null_default")]
    pub pool_id: String,
    #[serde(rename = "Address", deserialize_with = "null_default")]
    pub address: String,
    #[serde(rename = "Options", deserialize_with = "null_default")]
    pub options: HashMap<String, String>,
}

#[derive(Serialize, Debug)]
pub struct RequestAddressResponse {
    #[serde(rename = "Address", deserialize_with = "null_default")]
    pub address: String,
    #[serde(rename = "Data", deserialize_with = "null_default")]
    pub data: HashMap<String, String>,
}

/// ReleaseAddress.
#[derive(Deserialize, Default, Debug)]
#[serde(default)]
pub struct AddressRef {
    #[serde(rename = "PoolID", deserialize_with = "null_default")]
    pub pool_id: String,
    #[serde(rename = "Address", deserialize_with = "null_default")]
    pub address: String,
}
