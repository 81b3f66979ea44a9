// A fresh folder under the system's temporary folder ($TMPDIR), removed with everything in it
// when the object goes: for tests and fuzz targets that need files on disk.
#pragma once

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>

namespace sluice::test {

class TempDir {
public:
    explicit TempDir(const std::string &prefix = "sluice-test") {
        // mkdtemp() replaces the template's trailing six X's with a unique suffix.
        std::string pattern = std::filesystem::temp_directory_path() / (prefix + "-XXXXXX");
        if (::mkdtemp(pattern.data()) == nullptr) {
            throw std::runtime_error("cannot make a temporary folder like " + pattern);
        }
        path_ = pattern;
    }
    ~TempDir() {
        std::error_code ignored;
        std::filesystem::remove_all(path_, ignored);
    }
    TempDir(const TempDir &) = delete;
    TempDir &operator=(const TempDir &) = delete;

    const std::filesystem::path &path() const { return path_; }

    /** The path of `name` inside the folder. */
    std::string file(const std::string &name) const { return (path_ / name).string(); }

    /** Writes `text` to `name` (folders made as needed); returns its path. */
    std::string write(const std::string &name, std::string_view text) const {
        const std::filesystem::path file = path_ / name;
        std::filesystem::create_directories(file.parent_path());
        std::ofstream(file, std::ios::binary) << text;
        return file.string();
    }

private:
    std::filesystem::path path_;
};

} // namespace sluice::test
