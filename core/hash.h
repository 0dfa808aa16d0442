// SHA-256 (FIPS 180-4), used for content hashes of canonical configs: store keys must not collide
// and must not change between versions, platforms or runs.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>

namespace switchyard {

std::array<uint8_t, 32> sha256(std::string_view data);
std::string sha256_hex(std::string_view data);

}  // namespace switchyard
