// SLUICE_API marks what libsluice exports. The library is built with hidden symbols by default
// (-fvisibility=hidden), so only declarations carrying this macro are visible to a program that
// links libsluice.so; everything else (OpenSSL, libuv and toml++ glue, sluice's own internals)
// stays inside. With a static libsluice.a the macro changes nothing.
#pragma once

#if defined(__GNUC__) || defined(__clang__)
#define SLUICE_API __attribute__((visibility("default")))
#else
#define SLUICE_API
#endif
