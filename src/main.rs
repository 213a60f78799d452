fn main() {
    println!("meterd");
}
